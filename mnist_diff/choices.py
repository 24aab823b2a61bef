"""The names a user may choose, one home for each list. Imports nothing (no torch), so the CLI's `--help` and
the config load fast; the modules that implement a choice check their own name against these lists."""

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")
# The cosine schedule (Nichol & Dhariwal 2021) is defined by alpha_bar alone: beta_start and beta_end do nothing.
USES_BETA_RANGE = {"linear": True, "quadratic": True, "sigmoid": True, "cosine": False}
SAMPLERS = ("ddpm", "ddim")
PRECISIONS = ("auto", "fp32", "bf16")
FID_PRECISIONS = ("fp32", "bf16")  # Inception's features (fid.engine); fp32: torch-fidelity's own numbers
COMPILE_CHOICES = ("auto", "on", "off")
FUSED_CHOICES = ("auto", "on", "off")  # the UNet's fused forward (Config.fused)
FID_REFS = ("train", "test")  # the MNIST split FID compares against
DEVICES = ("auto", "cpu", "cuda", "mps")
REGISTERED_MODEL = "mnist-diff"  # the registered model a study's best goes to (`sweep --registered-model`)
