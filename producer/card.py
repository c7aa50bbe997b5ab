"""The dataset card (``README.md`` in the job folder) that ``producer finalize`` writes.

A Hugging Face style card: YAML front matter (so the hub's viewer finds the parquet
files), then what a user of the data needs before training on it: where the prompts
came from, which model at which revision made the images with which settings, how many
rows over which time span, what is missing, and the licence notes of source and model.
"""

from __future__ import annotations

import json
from typing import Any

from fewstep.presets import presets
from fewstep.settings import load_config
from producer.cost import cost_line


def _size_category(rows: int) -> str:
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < limit:
            return label
    return "1M<n<10M" if rows < 10_000_000 else "10M<n<100M"


def model_licence(spec: dict[str, Any]) -> str:
    """The licence note of the job's model preset, or where to look for a hub or local model."""
    model = spec["model"]
    preset = presets().get(model["name"])
    if preset and preset.get("license"):
        return str(preset["license"])
    return f"not recorded in config/models.toml: see the model card of {model.get('repo') or model['name']}"


def source_licence(spec: dict[str, Any]) -> str | None:
    name = spec["source"].get("name")
    entry = load_config("datasets").get(name) if name else None
    return entry.get("license") if isinstance(entry, dict) else None


LAYOUT_WORDS = {
    "files": "one object per image",
    "webdataset": "one WebDataset tar per part: image, `.json` metadata row and `.txt` prompt per sample",
    "parquet": "one parquet per part with the images in an `image` column (datasets' `Image`) "
    "next to every metadata column",
}


def _image_lines(layout: str, image_files: list[str]) -> list[str]:
    if layout == "files":
        return [
            "- `images/part-NNNNNN/<attempt-id>/NNNNNNNNNNNN.<ext>`: the images, named by global row id, "
            "in the folder of the attempt that committed the part (column `image_key`)"
        ]
    shown = [f"  - `{f}`" for f in image_files[:20]]
    more = [f"  - … {len(image_files) - 20:,} more, all listed in `finalized.json` (`image_files`)"]
    kind = "WebDataset tars" if layout == "webdataset" else "parquet files with the images"
    return [
        f"- {len(image_files):,} {kind}, one per part, written by the attempt that committed it "
        "(column `image_key`; `image_offset` is where an image's bytes start in its tar, `image_row` "
        "its row in its parquet). Other files under `images/` are losing attempts' until `producer gc` "
        "removes them: load this list, not a glob:",
        *shown,
        *(more if len(image_files) > 20 else []),
    ]


def _loading_lines(layout: str) -> list[str]:
    if layout == "webdataset":
        return [
            "",
            "# the images: WebDataset tars (samples with jpg/png/webp, json and txt)",
            "import json, webdataset as wds",
            'tars = json.load(open("finalized.json"))["image_files"]',
            'samples = wds.WebDataset(tars, shardshuffle=False).decode("pil")',
        ]
    if layout == "parquet":
        return [
            "",
            "# the images with their metadata: column `image` decodes to PIL images",
            "import json",
            'parts = json.load(open("finalized.json"))["image_files"]',
            'images = datasets.load_dataset("parquet", data_files=parts, split="train")',
        ]
    return []


def _jxl_lines(generation: dict[str, Any]) -> list[str]:
    """How to decode a ``--format jxl`` job's images: Pillow, webdataset and datasets do not by themselves."""
    if generation.get("format") != "jxl":
        return []
    kind = "lossless" if generation.get("quality") is None else f"lossy, quality {generation['quality']}"
    return [
        "",
        f"The images are JPEG XL (`.jxl`, {kind}). Pillow does not read JPEG XL by itself: decode the bytes "
        "with `imagecodecs` (`pip install imagecodecs`; `imagecodecs.jpegxl_decode(data)` gives a numpy "
        "array), or register a Pillow plugin first (`import pillow_jxl`, PyPI `pillow-jxl-plugin`, "
        "GPL-3.0), after which `PIL.Image.open` and the `datasets` `image` column read them:",
        "",
        "```python",
        "import imagecodecs, datasets, webdataset as wds",
        "",
        'pixels = imagecodecs.jpegxl_decode(open("000000000000.jxl", "rb").read())  # (H, W, 3) uint8',
        "# webdataset: name the decoder of the .jxl members",
        'samples = wds.WebDataset(tars).decode(wds.handle_extension("jxl", imagecodecs.jpegxl_decode))',
        "# datasets without a plugin: keep the bytes, decode them yourself",
        'rows = rows.cast_column("image", datasets.Image(decode=False))  # rows[0]["image"]["bytes"]',
        "```",
    ]


def _filter_lines(facts: dict[str, Any]) -> list[str]:
    """The ``Filters`` section: each ``--where`` and the near-duplicate step, with the rows removed."""
    steps, near = facts.get("filters") or [], facts.get("near_duplicates")
    if not steps and not near:
        return []
    lines = ["", "## Filters", ""]
    if steps:
        lines.append(
            f"Of {facts['committed_rows']:,} committed rows, {facts['rows']:,} are in this dataset. "
            "Applied in this order; each count is of the rows the steps before it kept, and a row "
            "with a null in a compared column (a score not computed) is removed by that condition:"
        )
        lines.append("")
    for step in steps:
        if "where" in step:
            lines.append(f"- `{step['where']}`: removed {step['removed']:,} rows")
        elif "per" in step:
            short = (facts.get("per_limit") or {}).get("short") or {}
            lines.append(
                f"- `--per {step['per']} --limit {step['limit']}`: the {step['limit']:,} passing rows "
                f"of each `{step['per']}` ranked highest, then by row id; removed {step['removed']:,} rows"
                + (f"; {len(short):,} values have fewer" if short else "")
            )
        else:
            lines.append(f"- near duplicates (`--drop-near-duplicates`): removed {step['removed']:,} rows")
    if near and not near["dropped"]:
        lines.append(
            f"- near duplicates (similarity >= {near['threshold']}, `producer dedupe`): "
            f"{near['rows']:,} rows have `near_duplicate_of` set and are kept; filter on that column, "
            "or finalize with `--drop-near-duplicates`"
        )
    return lines


def _conditioning_lines(spec: dict[str, Any]) -> list[str]:
    """How an image-conditioned job used its images (``spec["conditioning"]``)."""
    cond = spec.get("conditioning")
    if not cond:
        return []
    origin = (
        f"the images of job `{cond['source_job']}`"
        if cond.get("source_job")
        else (
            f"column `{cond.get('image_column')}`"
            + (f" under `{cond['image_root']}`" if cond.get("image_root") else "")
        )
    )
    how = ", ".join(
        f"{k.replace('_', ' ')} {cond[k]}"
        for k in ("strength", "controlnet_scale", "resize")
        if cond.get(k) is not None
    )
    return [
        f"- conditioning: **{cond['condition']}** from {origin} ({how}); per row: `cond_key`, `cond_sha256`"
    ]


def _scoring_lines(spec: dict[str, Any]) -> list[str]:
    """Which scorers filled the score columns, at which revisions (``spec["scoring"]``)."""
    scoring = spec.get("scoring") or {}
    scorers = scoring.get("scorers") or {}
    if not scorers and not scoring.get("embeddings"):
        return []
    named = ", ".join(
        f"`{n}` ({s.get('model')}@{s.get('revision')}"
        + (
            f", processor {s['processor']['model']}@{s['processor']['revision']}"
            if s.get("processor")
            else ""
        )
        + ")"
        for n, s in scorers.items()
    )
    extra = "; CLIP image embeddings in `embeddings/`" if scoring.get("embeddings") else ""
    return [f"- scores computed on the worker: {named or 'none'}{extra}"]


def _candidate_lines(spec: dict[str, Any]) -> list[str]:
    """Best-of-K (``spec["candidates"]``) and top-up rounds (``spec["rounds"]``, ``quota``)."""
    lines = []
    c = spec.get("candidates")
    if c:
        kept = "every candidate is a row" if c.get("keep") == "all" else "the best one is stored"
        lines.append(
            f"- best of {c['k']}: {c['k']} candidates a prompt, ranked by `{c['rank_by']}`; {kept}. "
            "`candidate`, `rank_score` and the `candidate_*` lists record every candidate's seed and scores"
        )
    rounds, quota = spec.get("rounds") or [], spec.get("quota")
    if quota:
        where = " and ".join(f"`{w}`" for w in quota["where"]) or "every row"
        per = f" per `{quota['per']}`" if quota.get("per") else ""
        lines.append(
            f"- quota: {quota['until']:,} rows{per} where {where}, filled by {len(rounds)} `producer topup` "
            "rounds (new seeds from job seed, round and row id; the same prompts)"
        )
    return lines


def dataset_card(spec: dict[str, Any], facts: dict[str, Any]) -> str:
    """The card's Markdown. ``facts`` are what finalize measured: rows, files, time span, missing."""
    job, model, gen, source = spec["job"], spec["model"], spec["generation"], spec["source"]
    files = facts["files"]
    data_files = files[0] if len(files) == 1 else "metadata-*.parquet"
    layout = facts.get("layout") or "files"
    image_files = facts.get("image_files") or []
    if layout == "parquet":  # the viewer shows the images: the image parquets are the default config
        configs = [("default", image_files), ("metadata", data_files)]
    elif layout == "webdataset":
        configs = [("default", data_files), ("webdataset", image_files)]
    else:
        configs = [("default", data_files)]
    front = [
        "---",
        f"pretty_name: {json.dumps(f'fewstep job {job}')}",
        "task_categories:",
        "- text-to-image",
        "tags:",
        "- synthetic",
        "- fewstep",
        "size_categories:",
        f"- {_size_category(facts['rows'])}",
        "configs:",
        *[
            line
            for name, where in configs
            for line in (f"- config_name: {name}", f"  data_files: {json.dumps(where)}")
        ],
        "---",
    ]
    settings = ", ".join(
        f"{k} {gen[k]}" for k in ("steps", "guidance", "width", "height", "sampler", "format") if k in gen
    )
    for k in ("png_encoder", "png_level", "quality", "effort"):
        if k in gen:
            settings += f", {k.replace('_', ' ')} {gen[k]}"
    selection = source.get("selection") or {}
    lines = [
        f"# fewstep job `{job}`",
        "",
        f"{facts['rows']:,} synthetic images generated by `{model['name']}` from the prompts of "
        f"`{source.get('name')}`, with one parquet row of metadata per image (DiffusionDB's columns first).",
        "",
        "## Source",
        "",
        f"- prompt set: `{source.get('name')}`"
        + (f" — {source['description']}" if source.get("description") else ""),
        f"- from: `{source.get('path') or source.get('url') or '?'}`",
    ]
    if selection:
        lines.append(f"- selection: `{json.dumps(selection)}`")
    if source.get("fields"):
        lines.append(f"- source fields kept as columns: {', '.join(f'`{f}`' for f in source['fields'])}")
    lines += [
        "",
        "## Model and settings",
        "",
        f"- model: `{model['name']}` ({model.get('kind')}), repository `{model.get('repo')}`, "
        f"revision `{model.get('revision')}`",
        f"- settings: {settings}",
        f"- seeds: derived from job seed {spec.get('seed')} and each prompt's source row "
        "(the same spec gives the same seeds)",
        f"- shard size: {spec.get('shard_size')} prompts",
        f"- layout: **{layout}** ({LAYOUT_WORDS[layout]})",
        *_conditioning_lines(spec),
        *_scoring_lines(spec),
        *_candidate_lines(spec),
        "",
        "## Counts",
        "",
        f"- images: {facts['rows']:,} of {spec['counts']['prompts']:,} prompts "
        f"({facts['shards']:,} of {spec['counts']['shards']:,} parts)",
        f"- bytes of images: {facts['image_bytes']:,}",
        f"- prompts truncated by the text encoder: {facts['truncated']:,}; flagged NSFW: {facts['nsfw']:,}",
        f"- workers: {facts['workers']:,}",
        *([f"- cost: {cost_line(facts['cost'])}"] if facts.get("cost") else []),
        f"- generated between {facts['first_created']} and {facts['last_created']} (UTC); "
        f"job enqueued {spec.get('created_at')}",
    ]
    lines += _filter_lines(facts)
    if facts["missing_shards"]:
        shown = ", ".join(f"part-{s:06d}" for s in facts["missing_shards"][:20])
        more = " …" if len(facts["missing_shards"]) > 20 else ""
        lines += [
            "",
            "## Missing (finalized with --partial)",
            "",
            f"{len(facts['missing_shards']):,} parts ({facts['missing_rows']:,} prompts) were not committed "
            f"when this was written: {shown}{more}.",
        ]
    lines += [
        "",
        "## Files",
        "",
        *[f"- `{f}`: the metadata, {facts['rows']:,} rows in all" for f in files[:1]],
        *[f"- `{f}`" for f in files[1:]],
        *_image_lines(layout, image_files),
    ]
    if facts.get("json_parts"):
        lines.append("- `images/part-NNNNNN/part-NNNNNN.json`: DiffusionDB-style prompts per part")
    if facts.get("webdataset"):
        lines.append(
            f"- `webdataset/part-NNNNNN.tar`: {len(facts['webdataset']):,} WebDataset shards "
            "(image, `.json` metadata and `.txt` prompt per sample)"
        )
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "import glob",
        "",
        "import datasets",
        "import pyarrow.dataset as ds",
        "",
        "# from a local copy of this folder",
        f'rows = datasets.load_dataset("parquet", data_files="{data_files}", split="train")',
        f'table = ds.dataset(sorted(glob.glob("{data_files}"))).to_table()',
        *_loading_lines(layout),
        "```",
        *_jxl_lines(gen),
        "",
        "Read straight from S3 with `storage_options` (datasets, s3fs) or `pyarrow.fs.S3FileSystem`.",
        "",
        "## Licences",
        "",
        f"- model `{model['name']}`: {model_licence(spec)}",
        f"- prompt set `{source.get('name')}`: {source_licence(spec) or 'see its source'}",
        *[
            f"- scorer `{name}` (`{s.get('model')}`): {s.get('licence') or 'not stated by its card'}"
            for name, s in ((spec.get("scoring") or {}).get("scorers") or {}).items()
        ],
        "- The images are synthetic; check both licences before you redistribute them or train on them.",
        "",
    ]
    return "\n".join([*front, "", *lines])
