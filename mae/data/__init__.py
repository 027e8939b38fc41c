"""What a run reads: image folders, the built-in shapes and digits, and the Pillow augmentation
(`images`); bytes-only workers with GPU decode and the fused crop (`gpu`); WebDataset shards
(`shards`); video clips (`video`). Above mae_kernels only."""
