"""`pipeline console`: a web app over the runs folder and the endpoint (runs, data, training, export,
playground, launch). runs.py reads the run folders, launch.py starts and stops commands, app.py serves
the pages."""
