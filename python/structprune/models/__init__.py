"""Models: the output formats a pruned model is written in and how each is built, loading a
checkpoint as a model, the shape check that an output loads, and the DeciLM classes."""
