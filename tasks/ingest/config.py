"""What `ingest` is asked to do (`IngestConfig`) and what it reports back (`IngestResult`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ray_jobs.data.image_prep import MAX_FILE_BYTES
from ray_jobs.dataset_format import SPLITS

FINGERPRINT_FIELD = "{fingerprint}"  # in `out`: replaced by the build's short fingerprint


class IngestConfig(BaseModel):
    """Everything `ingest` needs. Defaults live here only (the CLI passes just what the user set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    src: Path = Field(description="ImageFolder tree: SRC/<class>/<img>, or SRC/<split>/<class>/<img> with split "
                      "folders train, val (or valid, validation) and test.")
    out: str = Field(description="Output folder or pyarrow.fs URI (s3://bucket/prefix); a last part holding "
                     "'{fingerprint}' is named after the build (the flow's datasets/<source>-{fingerprint}).")
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="Share of each class carved into val.")
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="Share of each class carved into test.")
    seed: int = Field(default=0, description="Seeds the split and the row shuffle.")
    max_side: int | None = Field(default=None, ge=1, description="Re-encode images whose longest side is larger.")
    max_file_bytes: int = Field(default=MAX_FILE_BYTES, ge=1,
                                description="Quarantine larger files unread (a stray video, a disk image).")
    shard_rows: int = Field(default=2048, ge=1, description="At most this many rows per Parquet file.")
    shard_bytes: int = Field(default=64 * 2**20, ge=1, description="About this many image bytes per Parquet file.")
    workers: int | None = Field(default=None, ge=1, description="Decode processes; None = os.cpu_count().")
    decode_timeout_s: float = Field(
        default=60.0, gt=0.0, description="A file whose decoding takes longer is quarantined as 'decoder timed out'."
    )
    force: bool = Field(default=False, description="Rebuild even when DIR already holds this build "
                        "(never replaces another build).")

    @field_validator("out", mode="before")
    @classmethod
    def _path_to_str(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("out")
    @classmethod
    def _fingerprint_names_the_folder(cls, value: str) -> str:
        if FINGERPRINT_FIELD in value.rstrip("/").rpartition("/")[0] or value.count(FINGERPRINT_FIELD) > 1:
            raise ValueError(f"{FINGERPRINT_FIELD} may only appear once, in the last part of the output path")
        return value

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> IngestConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1 "
                             f"(got {self.val_fraction} + {self.test_fraction})")
        return self

    def options(self) -> dict[str, Any]:
        """The options that change the output (fingerprinted and stored in the manifest)."""
        return self.model_dump(include={"val_fraction", "test_fraction", "seed", "max_side", "max_file_bytes",
                                        "shard_rows", "shard_bytes"})


@dataclass(frozen=True)
class IngestResult:
    """Where the dataset is, its manifest, whether this run skipped all work or waited for another
    ingest of DIR, and the temporary folders of killed runs it cleaned up next to a local DIR."""

    out: str
    manifest: dict[str, Any]
    skipped: bool
    cleaned: tuple[str, ...] = ()
    waited: bool = False

    def summary(self) -> str:
        """A few human-readable lines: the file accounting, split sizes and warnings."""
        m = self.manifest
        lines = [f"ingest: {m['files_seen']} files seen = {m['rows_written']} rows written"
                 f" + {m['quarantined']} quarantined + {m['duplicates_dropped']} duplicates dropped"]
        if self.skipped:
            lines.insert(0, f"ingest: {self.out} is up to date (fingerprint {m['fingerprint'][:12]}), "
                            "nothing to do; use --force to rebuild")
        if self.waited:
            lines.insert(0, f"ingest: waited for another ingest of {self.out} to finish")
        sizes = ", ".join(f"{split} {sum(m['counts'][split].values())}" for split in SPLITS)
        carved = "".join(f"; {split} carved from {src}" for split, src in m["splits_carved"].items())
        lines.append(f"  {len(m['classes'])} classes; rows: {sizes}{carved}")
        if m.get("reencoded"):
            reasons = ", ".join(f"{count} {reason}" for reason, count in m["reencoded"].items())
            lines.append(f"  re-encoded for the training decoder: {reasons}")
        if m.get("links_not_followed"):
            lines.append(f"  {m['links_not_followed']} symbolic link(s) not followed (quarantined: see manifest.json)")
        for item in m.get("skipped_folders", []):
            lines.append(f"  skipped folder {item['path']}: {item['reason']}")
        for item in m["small_classes"]:
            lines.append(f"  warning: class {item['class_name']!r} ({item['images']} images) "
                         f"is missing from {', '.join(item['missing_from'])}")
        for path in self.cleaned:
            lines.append(f"  cleaned up {path}, left by an interrupted ingest")
        lines.append(f"  dataset: {self.out}")
        return "\n".join(lines)
