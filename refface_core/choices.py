"""The choices users pick by name and the limits of their numbers (CLI, nodes, API), importable without torch so
that `refface --help` stays fast."""

SPACINGS = ("uniform", "uniform_trailing")  # ReF-LDM's DDIM timestep spacings
SOLVERS = ("ddim", "dpmpp_2m")
GUIDANCES = ("refldm", "multi_reference")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")  # and "cuda:N"
MAX_SEED = 2**63 - 1  # what torch.Generator and ComfyUI's seed widgets both take
MAX_REF_SLOTS = 64  # per branch: each slot adds a reference's keys and values to every attention layer
EVAL_SETS = ("ffhq-ref-severe", "ffhq-ref-moderate", "celeba-test-ref", "folder")  # `refface eval --set`
# What `refface eval --sweep` can vary, and how each value is read; "refs" is the number of references a face gets.
SWEEPABLE: dict[str, type] = {
    "guidance": str,
    "scale": float,
    "s_i": float,
    "s_c": float,
    "refs": int,
    "ref_slots": int,
    "steps": int,
    "solver": str,
    "spacing": str,
    "context_scale": float,
}
