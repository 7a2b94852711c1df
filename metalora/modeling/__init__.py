"""The model and its LoRA adapters: loading (hub, local, embedded), wrapping with peft, adapter files."""
