# GPT-2 124M on OpenWebText with SophiaG (Liu et al. 2023), its published GPT-2 small config.
# python train.py config/train_gpt2.py config/train_gpt2_sophiag.py
optimizer = "sophiag"
out_dir = "out-gpt2-sophiag"
lr = 6e-4  # medium 7e-4 (rho 0.08), large 3e-4 (rho 0.05)
min_lr = 6e-5
beta1 = 0.965
beta2 = 0.99
rho = 0.05
weight_decay = 0.2
hess_interval = 10  # k: one Gauss-Newton-Bartlett Hessian estimate every 10 steps
