"""The choices users pick by name (CLI, nodes, API), importable without torch so that `refface --help` stays fast."""

SPACINGS = ("uniform", "uniform_trailing")  # ReF-LDM's DDIM timestep spacings
SOLVERS = ("ddim", "dpmpp_2m")
GUIDANCES = ("refldm", "multi_reference")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")  # and "cuda:N"
