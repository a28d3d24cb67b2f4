"""The browser client's files (JavaScript in ``client/``, pages, the npm lockfile) and the Python
that serves them: :mod:`edge_client.web.site` stages a directory a phone opens (``fedpara web``)."""
