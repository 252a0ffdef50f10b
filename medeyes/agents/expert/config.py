"""The expert's settings: GRN + CVS constants and the ablation modes, apart from the agent that uses them."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

ExpertMode = Literal["full", "scan_only", "drill_only", "greedy", "random"]
"""``full`` (GRN + CVS), and the ablations of :mod:`medeyes.agents.expert.agent`'s module docstring."""

EXPERT_MODES: tuple[str, ...] = get_args(ExpertMode)
"""The modes as a tuple, for choices and "did you mean" hints (derived from :data:`ExpertMode`)."""


class ExpertConfig(BaseModel):
    """GRN + CVS constants (paper values as defaults) and our own choices where the paper is silent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: ExpertMode = Field(
        default="full",
        description="full (GRN+CVS), scan_only, drill_only, greedy (without CVS), random (random boxes, same lengths).",
    )
    delta: float = Field(default=0.15, description="Information-gain threshold to keep drilling (paper 0.15).")
    eps: float = Field(default=1e-6, gt=0.0, description="Epsilon in the information gain's denominator (paper 1e-6).")
    max_regions: int = Field(default=5, ge=1, le=5, description="Most regions shown in one scan (paper 5).")
    t_max: int = Field(default=4, ge=1, le=32, description="T_max: most tool turns before answering (paper 4).")
    p0: float = Field(default=0.9, gt=0.0, le=1.0, description="CVS nucleus mass (paper 0.9).")
    temperature: float = Field(default=0.2, gt=0.0, description="CVS softmax temperature over confidences (ours).")
    xi: float = Field(default=0.85, ge=0.0, le=1.0, description="Answer once a drilled confidence reaches xi (0.85).")
    n_expert: int = Field(default=6, ge=1, le=64, description="Trajectories drawn per case (paper 6).")
    keep_only_correct: bool = Field(default=True, description="Store only trajectories whose answer is correct.")
    low_gain: Literal["scan", "next"] = Field(
        default="scan",
        description="After a drill that gained less than delta: scan again (the paper as written), or drill the "
        "next candidate of the last scan while one is left undrilled (ours: a reader who found nothing in one "
        "candidate looks at the other one the scan showed, without a new scan turn).",
    )
    presence_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Final confidence at which a region counts as abnormal (ours)."
    )
    count_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Final confidence at which a region is counted (ours)."
    )
    merge_iou: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="Two boxes are one region at this IoU, or when their centres are within half a box side.",
    )
    sub_region_scale: float = Field(
        default=0.6, gt=0.1, lt=1.0, description="Side of a drilled sub-region relative to its parent region (ours)."
    )
    side_convention: Literal["image", "patient"] = Field(
        default="image", description="Whether 'left' in a question means the image's left or the patient's left."
    )
    trust_drills: bool = Field(
        default=True, description="Answer from the best drilled region when any was drilled, not a scanned one (ours)."
    )
    empty_scan_retries: int = Field(
        default=2, ge=0, le=10, description="Extra looks when a scan finds nothing, before concluding there is nothing."
    )
    random_box_range: tuple[float, float] = Field(
        default=(0.02, 0.3),
        description="Random mode: box side range as a fraction of the image's shorter side (log-uniform).",
    )
    global_questions: Literal["look", "answer"] = Field(
        default="look",
        description="Questions no region can inform (modality, ...): look (scan and drill like any other) or "
        "answer from the overview at once (what an information-gain navigator does when regions add nothing).",
    )
    seed: int = Field(default=0, description="Base seed; each episode's stream also mixes in its episode seed.")
