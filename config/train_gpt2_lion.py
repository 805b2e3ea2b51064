# GPT-2 124M on OpenWebText with Lion (Chen et al. 2023).
# python train.py config/train_gpt2.py config/train_gpt2_lion.py
optimizer = "lion"
out_dir = "out-gpt2-lion"
lr = 1e-4  # Sophia's Lion baseline for GPT-2 small and medium (8e-5 for large)
min_lr = 1e-5
beta1 = 0.9  # Lion's defaults (0.9, 0.99)
beta2 = 0.99
weight_decay = 1.0  # Lion paper: 3-10x AdamW's (0.1) since its lr is 3-10x smaller; lr * wd = 1e-4
