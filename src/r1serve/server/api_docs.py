"""GET /docs: Swagger UI over /openapi.json, its files served by r1serve itself.

FastAPI's default page loads Swagger UI from a CDN, which an offline or air-gapped host
cannot reach; the files come from the fastapi-swagger package instead (Swagger UI 5, which
reads the OpenAPI 3.1 that /openapi.json is), as FastAPI's self-hosting recipe does.
"""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse

from r1serve.server.errors import APIError

ASSETS = {"swagger-ui-bundle.js": "application/javascript", "swagger-ui.css": "text/css",
          "favicon-32x32.png": "image/png"}


def add_api_docs(app: FastAPI, path: str = "/docs") -> None:
    files = resources.files("fastapi_swagger") / "resources"

    @app.get(path, include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="r1serve API",
                                   swagger_js_url=f"{path}/assets/swagger-ui-bundle.js",
                                   swagger_css_url=f"{path}/assets/swagger-ui.css",
                                   swagger_favicon_url=f"{path}/assets/favicon-32x32.png")

    @app.get(path + "/assets/{name}", include_in_schema=False)
    async def swagger_asset(name: str):
        if name not in ASSETS:
            raise APIError(404, f"no such file: {path}/assets/{name}")
        return FileResponse(str(files / name), media_type=ASSETS[name])
