# GPT-2 124M on OpenWebText with AdamW-LW: AdamW's direction, a step size per layer from the curvature
# along it (optimizers/lwas.py; Bahamou and Goldfarb 2023).
# python train.py config/train_gpt2.py config/train_gpt2_adamw_lw.py
# Nothing is published for GPT-2: these are untested starting points. On the tiny-cpu overfit sweep the
# best eta put eta * alpha_max at AdamW's best rate, and most layers sat at the cap.
optimizer = "adamw_lw"
out_dir = "out-gpt2-adamw-lw"
lr = 0.1  # eta, the multiplier on the curvature step sizes (the tiny-cpu sweep's best), cosine to min_lr
min_lr = 0.01
lw_alpha_max = 6e-3  # with eta = 0.1 no layer steps faster than nanoGPT's AdamW rate, 6e-4
lw_warmup_lr = 6e-4  # nanoGPT's AdamW rate, for the steps before the curvature averages exist
lw_warmup_steps = 100
# a sampled-label backward and a JVP on one micro-batch per 10 steps of 40 micro-batches: ~0.5% more work
lw_interval = 10
lw_beta = 0.9  # averages over ~10 refreshes (100 steps)
