

def hopper_unavailable_reason() -> str | None:
  """None if the default JAX device is a Hopper GPU (compute capability 9.x: H100, H200), the
  only GPUs these Mosaic GPU kernels are written for; else why not."""
  import jax
  try:
    dev = jax.devices()[0]
  except RuntimeError as e:
    return f"no JAX device ({e})"
  if dev.platform != "gpu":
    return f"needs a GPU, default backend is {dev.platform}"
  cc = str(getattr(dev, "compute_capability", ""))
  if not cc.startswith("9"):
    return (f"needs a Hopper GPU (compute capability 9.x), got {getattr(dev, 'device_kind', '?')}"
            f" with {cc or 'unknown'}")
  return None
