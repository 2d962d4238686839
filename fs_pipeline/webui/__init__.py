"""The local web page (webui.py): the pipeline's stages behind a browser page, with no second implementation.

app.py serves the page and its JSON API; jobs.py runs the long work (prepare, train, merge, speak) as
subprocesses of the command-line scripts, logged into the project, so that it outlives the page; uploads.py
checks what a browser sends before anything of it is written into a project.
"""
