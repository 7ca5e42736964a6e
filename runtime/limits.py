"""The bounds a generate call works within (no imports, so the command line can show them in ``--help``
without loading numpy or onnxruntime)."""

#: sequences per batch when the caller names none: memory is bounded by the batch, never by ``n`` (64: the
#: bundled model peaks at ~340 MB and runs fastest per molecule on CPU there; on a GPU pass a larger one)
DEFAULT_BATCH_SIZE = 64
#: the most refinement steps a call may ask for (models are trained for a handful; each step costs a call)
MAX_STEPS = 10_000

#: the highest sampling temperature a request may ask for: far above it every model samples uniform noise
#: (at 1e6 the bundled model prints random fragments and empty lines), which is never what was meant
MAX_TEMPERATURE = 100.0

#: the most onnxruntime intra-op threads per CPU core: more only oversubscribes the cores (onnxruntime's
#: threads spin while they wait, so 10,000 threads on 2 cores stall the machine instead of failing)
MAX_THREADS_PER_CPU = 4

#: the longest sequence and the largest vocabulary a model file may declare (every format): a file's buffers
#: are sized from them before its first call, so a corrupt value must fail as one line, not as a 34 GiB allocation
MAX_SEQ_LEN = 4096
MAX_VOCAB = 1 << 20

#: a prompt reader's sample that does not keep its prompt (``Sample.kept`` False) is drawn again this many times
#: by default, with a new layout and new randomness (``retries``); ``MAX_RETRIES`` bounds what a caller may ask
DEFAULT_RETRIES = 3
MAX_RETRIES = 100
