"""Redraw the plot and the markdown summary of a stored bench result.

    python bench/plot.py bench/results/<device>.json      # writes <device>.png and <device>.md beside it

The bench itself (python -m fusedaccum bench) writes both; this is for re-rendering a JSON
after changing the plot or the summary code, without measuring again."""

import json
import sys
from pathlib import Path

from fusedaccum.bench.plot import write_plot
from fusedaccum.bench.report import markdown


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    path = Path(argv[0])
    results = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(results))
    write_plot(results, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.md')}, {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
