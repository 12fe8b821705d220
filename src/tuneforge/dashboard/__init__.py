"""The web dashboard: runs and jobs, their live curves, reports and checkpoints, a new-job form, a chat
playground and run comparison, served by `tuneforge api` (its jobs, per API key) and by `tuneforge ui`
(the run folders under a directory).

`runs.py` reads run folders, `sources.py` gives the pages their runs (`JobRuns`, `FolderRuns`),
`routes.py` is the pages and the JSON its script calls, `app.py` the app of `tuneforge ui` and `command.py`
the command. Importing the package is cheap (no torch, no FastAPI): `tuneforge ui` checks its arguments first.
Templates and static files ship inside the package: nothing is fetched from elsewhere.
"""
