"""The choices users pick by name and the limits of their numbers (CLI, nodes, API), importable without torch so
that `refface --help` stays fast."""

SPACINGS = ("uniform", "uniform_trailing")  # ReF-LDM's DDIM timestep spacings
SOLVERS = ("ddim", "dpmpp_2m")
GUIDANCES = ("refldm", "multi_reference")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")  # and "cuda:N"
MAX_SEED = 2**63 - 1  # what torch.Generator and ComfyUI's seed widgets both take
MAX_REF_SLOTS = 64  # per branch: each slot adds a reference's keys and values to every attention layer
# `refface album`: references per person (ReF-LDM's most), and the Laplacian variance of a face's 512 px aligned crop
# at which it needs no restoring (sharp photos measured 97-412 there, moderately degraded ones 38-52 and small or
# blurred ones under 12).
ALBUM_MAX_REFERENCES = 5
ALBUM_KEEP_SHARP = 60.0
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
