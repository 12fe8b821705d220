"""The web dashboard: runs and jobs, their live curves, reports and checkpoints, a new-job form, a chat
playground and run comparison, served by `tuneforge api` (its jobs, per API key) and by `tuneforge ui`
(the run folders under a directory).

`runs.py` reads run folders, `sources.py` gives the pages their runs (`JobRuns`, `FolderRuns`),
`routes.py` is the pages and the JSON its script calls, `app.py` the app of `tuneforge ui`.
Templates and static files ship inside the package: nothing is fetched from elsewhere.
"""

from .routes import PREFIX, install_dashboard
from .sources import FolderRuns, JobRuns

__all__ = ["PREFIX", "FolderRuns", "JobRuns", "install_dashboard"]
