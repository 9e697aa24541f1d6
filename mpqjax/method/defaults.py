"""The method's default settings (documented in docs/METHOD.md); no jax import, so the CLI's
--help can show them."""

DEFAULT_TARGET_BITS = 6.0
DEFAULT_OUTLIER_THRESHOLD = 25.0
# τ_tdc and B = 2 τ_tdc (so N_max = 2 can act): chosen on the shipped demo model, where they skip
# 50% of block evaluations with adherence and PSNR vs bf16 unchanged (benchmarks/RESULTS.md)
DEFAULT_TDC_THRESHOLD = 0.15
DEFAULT_TDC_ERROR_BOUND = 0.30
DEFAULT_TDC_MAX_SKIPS = 2
TDC_CACHES = ("bf16", "int8")      # how the cache stores Δ (mpqjax.method.tdc); bf16 default
DEFAULT_TDC_WARMUP_FRACTION = 0.1   # warm-up steps = max(2, round(0.1 * S))
DEFAULT_ATTENTION_EDGE_STEPS = 1    # first and last step keep bf16 attention (issue 10)
# PV formats of the INT8 attention (mpqjax.attention): fp8 (the default, fastest), fp8x2 (V as
# two e4m3 terms: within the accuracy bars), bf16
ATTENTION_PVS = ("fp8", "fp8x2", "bf16")
