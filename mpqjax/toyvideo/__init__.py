"""The toy text-to-video model shipped with mpqjax (the default model of `mpqjax generate`).

data.py     procedural clips of colored shapes moving, with captions from a small grammar
text.py     word tokenizer + small learned text encoder ([B, T, D], T5's role)
analyze.py  deterministic color/direction analyzer (prompt adherence)
train.py    training (AdamW + warm-up + EMA, v-prediction on CogVideoX's scheduler)
weights.py  loading the shipped weights (weights/toyvideo.safetensors + toyvideo.json)
"""
