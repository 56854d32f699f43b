"""The image model: one loader for the small LDM or a real SD v1.x, its CLIP BPE tokenizer,
and the small LDM's training and held-out evaluation (stage ``train_ldm``)."""
