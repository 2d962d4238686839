"""Where a project's outputs live: results/<project>/."""

from dataclasses import dataclass
from pathlib import Path

from fs_pipeline import PipelineError

RESULTS_ROOT = Path("results")


@dataclass(frozen=True)
class Project:
    name: str
    root: Path = RESULTS_ROOT

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise PipelineError(f"invalid project name '{self.name}': use a plain name such as my_voice")

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"
