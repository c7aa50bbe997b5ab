"""Image-conditioned jobs, the producer's side: the ``--condition`` options checked against the
preset and written into the job spec (``spec["conditioning"]``, part of the job's identity).

Which conditioning a preset takes is data in ``config/models.toml``: an ``[NAME.img2img]``
table (``pipeline``, ``strength``, optionally ``steps``) makes ``--condition init`` possible; a
``[NAME.control]`` table (``modes``, ``default``, ``scale``) makes it a ControlNet preset, which
runs the modes it lists and cannot run a text-only job. Defaults that are not the preset's are
in ``config/defaults.toml`` ``[conditioning]``. Where the images come from is
:mod:`producer.image_refs`; what the worker does with them is docs/CONDITIONING.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fewstep import UserError
from fewstep.settings import defaults

INIT = "init"
CONDITIONS = (INIT, "canny", "sketch", "as-is")
RESIZES = ("center-crop", "pad", "stretch")


@dataclass(frozen=True)
class ConditioningOptions:
    """The conditioning flags of ``producer enqueue`` (None: not given, take the default)."""

    image_column: str | None = None
    image_root: str | None = None
    condition: str | None = None
    strength: float | None = None
    controlnet_scale: float | None = None
    canny_low: int | None = None
    canny_high: int | None = None
    resize: str | None = None
    save_control: bool = False
    skip_missing_images: bool = False

    def given(self) -> list[str]:
        """The flags given, as the user typed them (``--strength``)."""
        return [
            "--" + f.name.replace("_", "-")
            for f in fields(self)
            if getattr(self, f.name) not in (None, False)
        ]


def takes_images(preset: dict[str, Any]) -> bool:
    """Whether the preset can be conditioned on an image at all."""
    return bool(preset.get("img2img") or preset.get("control"))


def choose_condition(preset: dict[str, Any], opts: ConditioningOptions, has_images: bool) -> str | None:
    """The job's conditioning mode: the one asked for, else the preset's (init where it has an
    img2img table, else its control default); None for a text-only job. A :class:`UserError`
    when the images and the preset do not go together."""
    name = preset["name"]
    if not has_images:
        extra = opts.given()
        if extra:
            raise UserError(
                f"{', '.join(extra)}: only for jobs with conditioning images; pass --image-column "
                "(or enqueue another job's images with `producer enqueue job`)"
            )
        if preset.get("control"):
            raise UserError(
                f"model {name} is a ControlNet preset and needs a conditioning image per row: "
                "pass --image-column COLUMN (or use `producer enqueue job`)"
            )
        return None
    if not takes_images(preset):
        raise UserError(
            f"model {name} takes no conditioning image (its preset has no img2img or control table)"
        )
    if opts.condition is None:
        return INIT if preset.get("img2img") else preset["control"]["default"]
    if opts.condition not in CONDITIONS:
        raise UserError(f"unknown --condition {opts.condition!r}: use one of {', '.join(CONDITIONS)}")
    if opts.condition == INIT and not preset.get("img2img"):
        modes = ", ".join(preset["control"]["modes"])
        raise UserError(f"model {name} cannot run --condition init (no img2img pipeline); it runs {modes}")
    if opts.condition != INIT:
        modes = (preset.get("control") or {}).get("modes", [])
        if opts.condition not in modes:
            offer = ", ".join(modes) if modes else "init only"
            raise UserError(f"model {name} cannot run --condition {opts.condition} (it runs {offer})")
    return opts.condition


def default_steps(preset: dict[str, Any], condition: str | None) -> int:
    """Steps when ``--steps`` is not given: the img2img table's for init, else the preset's."""
    if condition == INIT and "steps" in preset["img2img"]:
        return int(preset["img2img"]["steps"])
    return int(preset["steps"])


def _refuse_unless(condition: str, wanted: tuple[str, ...], given: dict[str, Any]) -> None:
    for flag, value in given.items():
        if value is not None and condition not in wanted:
            raise UserError(f"{flag} does not apply to --condition {condition} (only to {', '.join(wanted)})")


def conditioning_spec(
    preset: dict[str, Any],
    condition: str,
    steps: int,
    opts: ConditioningOptions,
    *,
    image_root: str | None,
    source_job: str | None,
) -> dict[str, Any]:
    """``spec["conditioning"]`` for a job conditioned by ``condition`` running ``steps`` steps.

    img2img denoises only ``int(steps * strength)`` steps (diffusers' ``get_timesteps``): a
    combination that runs none is refused here rather than making unchanged images.
    """
    config = defaults()["conditioning"]
    _refuse_unless(condition, (INIT,), {"--strength": opts.strength})
    _refuse_unless(condition, ("canny", "sketch", "as-is"), {"--controlnet-scale": opts.controlnet_scale})
    _refuse_unless(condition, ("canny",), {"--canny-low": opts.canny_low, "--canny-high": opts.canny_high})
    resize = opts.resize or config["resize"]
    if resize not in RESIZES:
        raise UserError(f"unknown --resize {resize!r}: use one of {', '.join(RESIZES)}")
    strength = scale = canny = None
    if condition == INIT:
        strength = float(preset["img2img"]["strength"] if opts.strength is None else opts.strength)
        if not 0 < strength <= 1:
            raise UserError(f"--strength must be in (0, 1], got {strength:g}")
        if int(steps * strength) < 1:
            raise UserError(
                f"model {preset['name']}: {steps} step(s) at strength {strength:g} run "
                f"int({steps} x {strength:g}) = 0 denoising steps; raise --steps "
                f"(steps x strength must be at least 1) or --strength"
            )
    else:
        default_scale = (preset.get("control") or {}).get("scale", config["controlnet_scale"])
        scale = float(default_scale if opts.controlnet_scale is None else opts.controlnet_scale)
        if scale < 0:
            raise UserError(f"--controlnet-scale must be at least 0, got {scale:g}")
    if condition == "canny":
        low = int(config["canny_low"] if opts.canny_low is None else opts.canny_low)
        high = int(config["canny_high"] if opts.canny_high is None else opts.canny_high)
        if not 0 <= low < high:
            raise UserError(f"canny thresholds must satisfy 0 <= low < high, got low {low}, high {high}")
        canny = {"low": low, "high": high}
    return {
        "condition": condition,
        "image_column": opts.image_column,
        "image_root": image_root,
        "source_job": source_job,
        "resize": resize,
        "strength": strength,
        "controlnet_scale": scale,
        "canny": canny,
        "save_control": bool(opts.save_control),
    }
