"""The DeciLM / Nemotron-NAS configuration and model classes structprune writes beside non-uniform
Llama-family checkpoints (``structprune.models.formats``). Each module depends only on torch and
transformers, so the copies in a checkpoint load with ``trust_remote_code=True`` anywhere."""
