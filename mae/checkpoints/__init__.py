"""What a run saves and what the commands load, never running code from a file: `.pth` and
`.safetensors` files written atomically (`files`), the sharded directories of an `--fsdp` run
(`sharded`), HF ViTMAE and timm formats (`interop`), and the model a pre-training checkpoint
describes (`pretrained`); what they share is in `format`. Above models and data."""
