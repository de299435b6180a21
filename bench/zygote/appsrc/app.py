"""The benchmark's application: a small Flask app on pandas and numpy (installed from the
package index into the benchmark's venv), the same file under every server.

At import it reads its release directory's ``RELEASE`` (the body names it, so a client
can tell which code answered) and, if the release has an ``IMPORT_SECONDS`` file, sleeps
until the import has taken that long in total (the "app whose import takes 3 s" of the
deploy measurement; the heavy imports count towards it).
"""

import time

_T0 = time.monotonic()

import os  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from flask import Flask, request  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name, default=None):
    try:
        with open(os.path.join(HERE, name)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return default


RELEASE = _read("RELEASE", "unknown")

# A table built at import, as an app loads its reference data once.
_rng = np.random.default_rng(12)
TABLE = pd.DataFrame(
    {
        "city": _rng.choice(["Lyon", "Oslo", "Porto", "Riga", "Turku"], size=200_000),
        "value": _rng.normal(100.0, 15.0, size=200_000),
        "count": _rng.integers(0, 1000, size=200_000),
    }
)

app = Flask(__name__)


@app.route("/")
def index():
    n = int(request.args.get("n", "2000"))
    sample = TABLE.sample(min(max(n, 1), 20_000), random_state=os.getpid() % 1000)
    summary = sample.groupby("city")["value"].mean().round(2).to_dict()
    return "release %s pid %d summary %s\n" % (RELEASE, os.getpid(), summary), 200, {
        "Content-Type": "text/plain"
    }


_delay = _read("IMPORT_SECONDS")
if _delay:
    time.sleep(max(0.0, float(_delay) - (time.monotonic() - _T0)))
