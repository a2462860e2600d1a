"""FedOTP (Li et al., CVPR 2024, "Global and Local Prompts Cooperation via Optimal Transport for
Federated Learning"; `HongxiaLee/FedOTP`): on a frozen CLIP host each client learns N prompt
contexts; the first `shared` of them are averaged by the server (FedAvg, example-weighted) and
the rest stay with the client, and an image is scored against a class by an optimal-transport
match of its patch features with the N prompts (`raysim.models.prompt_transport`).

Defaults are FedOTP's own few-shot script (`scripts/fedotp_few_shot.sh`): N = 2 prompts, one
averaged (`--avg_prompt 1`), 16 context words, `OT=COT` (the prompts take `top_percent` = 0.8 of
the patches' mass, each patch at most 1/M), ε = 0.01, at most 100 iterations, threshold 1e-3.
FairFedMed's FedOTP baseline (`scripts/fedchexmimic/fedotp_fedchexmimic.sh`) runs ε = 0.1 and
4 context words: `algorithm.ot_eps=0.1 algorithm.n_ctx=4`.

What travels: the shared contexts only (shared x n_ctx x the text width floats: 16 x 512 x 4 B
= 32 KB for ViT-B/16); the local contexts never leave the client (like FedPer's head). Each
client is scored with its own model: the new shared prompts and its own local ones. Rule
differences from the reference, both of the run loop, not the method: FedOTP trains every
client in its first round whatever the sampling fraction (raysim samples every round alike),
and never scores a site that did not train (raysim's held-out site gets the seeded local
prompts: `newcomer`).
"""

from __future__ import annotations

from torch import nn

from raysim.algorithms.base import register_algorithm
from raysim.algorithms.prompt_head import PromptHeadParams, without_local_prompts
from raysim.algorithms.promptfl import PromptFL


@register_algorithm("fedotp")
class FedOTP(PromptFL):
    """Shared prompts averaged, local prompts kept; images matched to prompts by transport."""

    Params = PromptHeadParams
    params: PromptHeadParams  # type: ignore[assignment]
    newcomer = "the averaged shared prompts with the seeded initial local prompts: a site that never trained has no local prompts of its own"

    def communicated(self, model: nn.Module) -> list[str]:
        return without_local_prompts(super().communicated(model))
