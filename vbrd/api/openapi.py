"""The OpenAPI 3.1 description of the API, served at ``/api/v1/openapi.json``.

Written by hand so that it says what a script writer needs (what each route answers, which
errors it gives, what needs the unix socket); a test walks the app's router and this document
and fails when one has a route the other lacks.
"""
from __future__ import annotations

from typing import Any

from vbrd import __version__

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string"}}


_UNAUTHORIZED = _error("Over TCP: no or wrong bearer token (given for every path, known or "
                       "not, before anything else is checked).")
_EMPTY_BODY = {"required": False, "content": {_JSON: {"schema": {
    "type": "object", "additionalProperties": False, "properties": {}}}}}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["type", "message"],
            "properties": {
                "type": {"type": "string", "description": "The error class, e.g. NotFound."},
                "message": {"type": "string", "description": "What is wrong, for a human."},
            }}},
    },
    "Session": {
        "type": "object",
        "required": ["id", "job", "trigger", "status", "reason", "started", "finished"],
        "properties": {
            "id": {"type": "string"}, "job": {"type": "string"},
            "trigger": {"type": "string", "description": "schedule, api or cli"},
            "status": {"type": "string",
                       "enum": ["running", "success", "warning", "failed", "stopped"]},
            "reason": {"type": "string"},
            "started": {"type": ["string", "null"], "format": "date-time"},
            "finished": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "Job": {
        "type": "object",
        "required": ["name", "vms", "transport", "schedule", "repository", "guest_processing",
                     "running_session", "last_session"],
        "properties": {
            "name": {"type": "string"},
            "vms": {"type": "array", "items": {"type": "string"}},
            "transport": {"type": "string", "enum": ["auto", "san", "hotadd", "nbd"]},
            "schedule": {"type": "string"},
            "repository": {"type": "string"},
            "guest_processing": {"type": "boolean"},
            "running_session": {"type": ["string", "null"]},
            "last_session": {"oneOf": [_ref("Session"), {"type": "null"}]},
        },
    },
    "Event": {
        "type": "object", "required": ["type", "phase", "session_id", "time", "monotonic"],
        "description": "One session event; further fields depend on the type "
                       "(session.started, phase.started, transfer.progress, ...).",
        "properties": {
            "type": {"type": "string"}, "phase": {"type": "string"},
            "session_id": {"type": "string"}, "vm": {"type": "string"},
            "disk": {"type": ["integer", "null"]},
            "time": {"type": "string", "format": "date-time"},
            "monotonic": {"type": "number"},
        },
        "additionalProperties": True,
    },
    "DiskSummary": {
        "type": "object", "required": ["vm", "disk"],
        "properties": {
            "vm": {"type": "string"}, "disk": {"type": ["integer", "null"]},
            "mode": {"type": "string", "description": "The transport mode that read the disk."},
            "bytes_read": {"type": "integer"}, "bytes_sent": {"type": "integer"},
            "bytes_stored": {"type": "integer"}, "blocks_total": {"type": "integer"},
            "incremental": {"type": "boolean"}, "reason": {"type": "string"},
        },
    },
    "SessionInfo": {
        "allOf": [_ref("Session"), {
            "type": "object", "required": ["disks", "events"],
            "properties": {
                "disks": {"type": "array", "items": _ref("DiskSummary")},
                "events": {"type": "array", "items": _ref("Event")},
            }}],
    },
    "RestorePoint": {
        "type": "object", "required": ["repository", "point_id", "vm", "damaged"],
        "description": "A restore point as the repository describes it, plus its repository. "
                       "A damaged (quarantined) one says why and is never restored or built "
                       "upon.",
        "properties": {
            "repository": {"type": "string"}, "point_id": {"type": "string"},
            "vm": {"type": "string"},
            "damaged": {"type": "boolean"},
            "reason": {"type": "string", "description": "Why a damaged point is out of use."},
            "kind": {"type": "string", "enum": ["full", "incremental", ""],
                     "description": "What was read: the whole disks, or their changes since "
                                    "the parent."},
            "sequence": {"type": "integer",
                         "description": "The VM's points in commit order: 1, 2, 3, …"},
        },
        "additionalProperties": True,
    },
    "GcResult": {
        "type": "object", "required": ["repository", "ran"], "additionalProperties": True,
        "properties": {
            "repository": {"type": "string"}, "ran": {"type": "boolean"},
            "blocks_removed": {"type": "integer"}, "bytes_freed": {"type": "integer"},
            "blocks_kept": {"type": "integer"}, "bytes_kept": {"type": "integer"},
            "stale_removed": {"type": "integer"},
            "quarantined": {"type": "array", "items": {"type": "string"},
                            "description": "Points found with an unreadable index, now "
                                           "listed as damaged."},
        },
    },
    "Problem": {
        "type": "object", "additionalProperties": True,
        "description": "One thing verify found wrong (restore point, disk, offset, reason).",
    },
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vbrd API", "version": __version__,
            "description": "Start and follow backup jobs, list sessions and restore points. "
                           "Over TCP every request needs 'Authorization: Bearer TOKEN'; the "
                           "unix socket needs none (its file mode guards it).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
        },
        "paths": {
            "/api/v1/health": {"get": {
                "operationId": "getHealth",
                "summary": "Whether the daemon can keep its records, and what is wrong if not.",
                "responses": {
                    "200": _json({"type": "object", "required": ["status", "problems", "catalog"],
                                  "properties": {
                                      "status": {"type": "string", "enum": ["ok", "degraded"]},
                                      "problems": {"type": "array", "items": {"type": "string"}},
                                      "catalog": {"type": "object", "properties": {
                                          "pending": {"type": "integer"},
                                          "dropped": {"type": "integer"}}}}},
                                 "The daemon's health."),
                    "401": _UNAUTHORIZED,
                }}},
            "/api/v1/plugins": {"get": {
                "operationId": "listPlugins",
                "summary": "The loaded plugins, their hooks, modes and guest processors, and "
                           "the plugins that failed to load.",
                "responses": {
                    "200": _json({"type": "object", "required": ["plugins", "failures"],
                                  "properties": {
                                      "plugins": {"type": "array", "items": {
                                          "type": "object", "properties": {
                                              "name": {"type": "string"},
                                              "source": {"type": "string"},
                                              "version": {"type": "string"},
                                              "hooks": {"type": "array",
                                                        "items": {"type": "string"}},
                                              "transport_modes": {
                                                  "type": "array", "items": {"type": "string"}},
                                              "guest_processors": {
                                                  "type": "array",
                                                  "items": {"type": "string"}}}}},
                                      "failures": {"type": "array", "items": {
                                          "type": "object", "properties": {
                                              "name": {"type": "string"},
                                              "source": {"type": "string"},
                                              "reason": {"type": "string"}}}}}},
                                 "The plugins."),
                    "401": _UNAUTHORIZED,
                }}},
            "/api/v1/jobs": {"get": {
                "operationId": "listJobs", "summary": "The configured jobs and their state.",
                "responses": {
                    "200": _json({"type": "object", "required": ["jobs"], "properties": {
                        "jobs": {"type": "array", "items": _ref("Job")}}}, "The jobs."),
                    "401": _UNAUTHORIZED,
                }}},
            "/api/v1/jobs/{name}/start": {"post": {
                "operationId": "startJob", "summary": "Start a session of the job now.",
                "parameters": [_path_param("name", "The job's name in the config.")],
                "requestBody": _EMPTY_BODY,
                "responses": {
                    "202": _json({"type": "object", "required": ["session_id"], "properties": {
                        "session_id": {"type": "string"}}}, "The session started."),
                    "400": _error("The body is not an empty JSON object."),
                    "401": _UNAUTHORIZED,
                    "404": _error("No job of this name."),
                    "409": _error("The job is already running."),
                }}},
            "/api/v1/sessions": {"get": {
                "operationId": "listSessions", "summary": "Recent sessions, newest first.",
                "parameters": [
                    {"name": "job", "in": "query", "required": False,
                     "schema": {"type": "string"}, "description": "Only this job's sessions."},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "default": 100}},
                ],
                "responses": {
                    "200": _json({"type": "object", "required": ["sessions"], "properties": {
                        "sessions": {"type": "array", "items": _ref("Session")}}},
                        "The sessions."),
                    "400": _error("A query parameter is not valid."),
                    "401": _UNAUTHORIZED,
                }}},
            "/api/v1/sessions/{id}": {"get": {
                "operationId": "getSession",
                "summary": "A session's record, its events and a summary per disk.",
                "parameters": [_path_param("id", "The session id.")],
                "responses": {
                    "200": _json(_ref("SessionInfo"), "The session."),
                    "401": _UNAUTHORIZED,
                    "404": _error("No such session."),
                }}},
            "/api/v1/sessions/{id}/events": {"get": {
                "operationId": "followSession",
                "summary": "The session's events as server-sent events, stored then live, "
                           "ending after session.finished.",
                "description": "Each message has 'id' (the event's position in the session), "
                               "'event' (its type) and 'data' (the event as JSON). Send "
                               "'Last-Event-ID: N' to continue after the Nth event.",
                "parameters": [
                    _path_param("id", "The session id."),
                    {"name": "Last-Event-ID", "in": "header", "required": False,
                     "schema": {"type": "integer", "minimum": 0}},
                ],
                "responses": {
                    "200": {"description": "The event stream.",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "400": _error("Last-Event-ID is not a number."),
                    "401": _UNAUTHORIZED,
                    "404": _error("No such session."),
                }}},
            "/api/v1/sessions/{id}/stop": {"post": {
                "operationId": "stopSession",
                "summary": "Ask a running session to stop; cleanup (thaw, snapshot removal) "
                           "still runs.",
                "parameters": [_path_param("id", "The session id.")],
                "requestBody": _EMPTY_BODY,
                "responses": {
                    "202": _json({"type": "object", "required": ["session_id", "stopping"],
                                  "properties": {"session_id": {"type": "string"},
                                                 "stopping": {"type": "boolean"}}},
                                 "The stop was requested."),
                    "400": _error("The body is not an empty JSON object."),
                    "401": _UNAUTHORIZED,
                    "404": _error("No such session."),
                    "409": _error("The session is not running."),
                }}},
            "/api/v1/restore-points": {"get": {
                "operationId": "listRestorePoints", "summary": "Restore points, of one VM "
                                                              "or all.",
                "parameters": [{"name": "vm", "in": "query", "required": False,
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": _json({"type": "object", "required": ["restore_points"],
                                  "properties": {"restore_points": {
                                      "type": "array", "items": _ref("RestorePoint")}}},
                                 "The restore points."),
                    "401": _UNAUTHORIZED,
                }}},
            "/api/v1/restore-points/restore": {"post": {
                "operationId": "restoreDisk",
                "summary": "Write one disk of a restore point as a raw image to a path on the "
                           "daemon's machine. Unix socket only.",
                "requestBody": {"required": True, "content": {_JSON: {"schema": {
                    "type": "object", "required": ["point", "to"],
                    "additionalProperties": False,
                    "properties": {
                        "point": {"type": "string"},
                        "disk": {"type": ["integer", "null"],
                                 "description": "The disk's device key; may be left out "
                                                "when the point has one disk."},
                        "to": {"type": "string", "description": "An absolute path."},
                    }}}}},
                "responses": {
                    "200": _json({"type": "object", "required": ["point", "disk", "path"],
                                  "additionalProperties": True, "properties": {
                                      "point": {"type": "string"},
                                      "disk": {"type": "integer"},
                                      "path": {"type": "string"}}}, "The disk was restored."),
                    "400": _error("The body is not valid."),
                    "401": _UNAUTHORIZED,
                    "403": _error("Asked over TCP; restores are only accepted on the unix "
                                  "socket."),
                    "404": _error("No such restore point or disk."),
                }}},
            "/api/v1/restore-points/verify": {"post": {
                "operationId": "verifyRestorePoints",
                "summary": "Re-read every block of one restore point (or all) and check it.",
                "requestBody": {"required": False, "content": {_JSON: {"schema": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"point": {"type": ["string", "null"]}}}}}},
                "responses": {
                    "200": _json({"type": "object", "required": ["problems"], "properties": {
                        "problems": {"type": "array", "items": _ref("Problem")}}},
                        "What was found wrong; empty when all is well."),
                    "400": _error("The body is not valid."),
                    "401": _UNAUTHORIZED,
                    "404": _error("No such restore point."),
                }}},
            "/api/v1/restore-points/{id}": {"delete": {
                "operationId": "deleteRestorePoint",
                "summary": "Delete one restore point, good or damaged. Its blocks are freed by "
                           "the next gc.",
                "parameters": [_path_param("id", "The restore point's id.")],
                "responses": {
                    "200": _json({"type": "object", "required": ["point", "deleted"],
                                  "properties": {"point": {"type": "string"},
                                                 "deleted": {"type": "boolean"}}},
                                 "The point is gone."),
                    "401": _UNAUTHORIZED,
                    "404": _error("No such restore point."),
                }}},
            "/api/v1/gc": {"post": {
                "operationId": "collectGarbage",
                "summary": "Remove the blocks no restore point names, in one repository or "
                           "all; waits a while for writers (running backups) to finish.",
                "requestBody": {"required": False, "content": {_JSON: {"schema": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"repository": {"type": ["string", "null"]}}}}}},
                "responses": {
                    "200": _json({"type": "object", "required": ["results"], "properties": {
                        "results": {"type": "array", "items": _ref("GcResult")}}},
                        "What gc did in each repository."),
                    "400": _error("The body is not valid."),
                    "401": _UNAUTHORIZED,
                    "404": _error("No such repository."),
                    "500": _error("The repository is missing, or stayed in use by a writer."),
                }}},
            "/api/v1/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document.",
                "responses": {
                    "200": _json({"type": "object"}, "The OpenAPI document."),
                    "401": _UNAUTHORIZED,
                }}},
        },
    }
