"""Float models through the ES core (``hf``) and the fine-tuning tasks' rewards (``tasks``).

The limits below are shared by the adapter and ``intes finetune``, which checks its flags
with them before importing torch.
"""

MAX_RANK = 64  # rank of a member's side path
MAX_SEED = 2**32 - 1  # the noise keys use the seed's low 32 bits: larger seeds would alias
