from structprune.cli import main

main()
