"""A local search worker: ``python -m shrinkml.recipe_search.worker REQUEST.json INDEX WORKDIR``.

``shrinkml search --workers N`` starts N - 1 of these beside itself; each prepares the same pipeline,
creates or joins the study (Optuna settles a race to create it) and runs trials until the study is done or the deadline passes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from shrinkml.progress import SILENT
    from shrinkml.recipe_search.run import SearchRequest, _Session

    spec_path, index, workdir = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    request = SearchRequest.model_validate(spec["request"])
    journal = Path(spec["journal"]) if spec["journal"] else None
    session = _Session(request, Path(workdir), journal, worker=int(index), must_exist=False, progress=SILENT,
                       deadline=spec["deadline"])
    session.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
