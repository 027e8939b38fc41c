"""Training: the loop, resumption and logs every command shares (`engine`); `mae pretrain`,
`finetune`, `linprobe`, `ablate`; the online probe; the optimisers and schedule (`optim`) and the
recipe printout (`recipe`); multi-process runs (`distributed`), FSDP2 (`fsdp`), stop signals
(`preemption`) and TensorBoard / W&B (`tracking`). Above eval."""
