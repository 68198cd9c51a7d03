"""The baseline of bench/api_overhead.py: a bare FastAPI app with one `def` endpoint.

It parses the same body with a pydantic model (the service's own `EmailRequest`) and answers
201, with no authentication, journal, audit, logs, metrics or Exchange: what FastAPI, uvicorn
and HTTP on loopback cost by themselves on this machine.

    .venv/bin/python -m uvicorn bare_endpoint:app --app-dir bench --port 8001
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from vezaprovisioner.api.models import EmailRequest

app = FastAPI()


@app.post("/VezaProvisioner/api/v1/emails", status_code=201)
def create_email(body: EmailRequest) -> JSONResponse:
    return JSONResponse({"identity": body.identity, "status": "created"}, status_code=201)
