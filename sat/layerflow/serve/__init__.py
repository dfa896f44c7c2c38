"""``layerflow serve``: a local web page that runs the tasks and shows their layers side by side.

Python's standard library only (``http.server``) plus a static page: the HTTP API of
``/work/SERVE_API.md`` (README, "Web page"). One module per concept: :mod:`.catalog` (which config
each task and size runs with, and whether the tiny model stands in), :mod:`.uploads` (given layers
checked before they are kept), :mod:`.jobs` (the queue and its one worker), :mod:`.generation` (a
job run through the batch runner, so its folder is a normal sample folder), :mod:`.results` (what
the page shows of a finished job, its zip, compose), :mod:`.files` (serving files from inside the
output folder only) and :mod:`.server` (the routes).
"""
