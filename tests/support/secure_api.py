"""The API server's front door for pods, in front of the emulator: HTTPS, service-account tokens and RBAC.

Test support. kmock speaks plain HTTP and lets anyone do anything; a pod on a real cluster reaches the API server
over TLS (the service account's `ca.crt`), is known by its token, and may do only what the Roles bound to its
ServiceAccount allow. `SecureApi` does that much: it mints a token per ServiceAccount (the kubelet mounts it),
authorizes each request against the Roles and RoleBindings stored in the emulator (verbs, API groups,
resources with subresources, resourceNames), answers 401/403 as an API server would, and forwards the rest.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from support.emulator import Emulator

_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and kubernetes.default.svc, and its key (the certificate is its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("kubernetes.default.svc")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "apiserver.crt", directory / "apiserver.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def request_attributes(method: str, path: str) -> dict[str, str]:
    """What RBAC decides on: verb, API group, namespace, resource (with /subresource) and name."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    group = "" if parts[:1] == ["api"] else parts[1] if len(parts) > 1 else ""
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    namespace = ""
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    verb = _VERBS.get(method, method.lower())
    if verb == "get" and not name:
        verb = "watch" if "watch=" in path else "list"
    return {"verb": verb, "group": group, "namespace": namespace, "resource": resource, "name": name}


def allows(rule: Mapping[str, Any], request: Mapping[str, str]) -> bool:
    def has(key: str, value: str) -> bool:
        values = rule.get(key) or []
        return "*" in values or value in values

    names = rule.get("resourceNames") or []
    return (
        has("verbs", request["verb"])
        and has("apiGroups", request["group"])
        and has("resources", request["resource"])
        and (not names or request["name"] in names)
    )


class SecureApi:
    """HTTPS on 127.0.0.1 in front of `emulator`, for pods; `token()` mints their ServiceAccounts' tokens."""

    def __init__(self, emulator: Emulator, directory: Path) -> None:
        self.emulator = emulator
        self._tokens: dict[str, tuple[str, str]] = {}  # token → (namespace, service account)
        cert, key = self_signed(directory)
        self.ca = cert.read_text()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.denied: list[str] = []  # what was refused, for tests to read
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.host, self.port = "127.0.0.1", self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def token(self, namespace: str, service_account: str) -> str:
        for token, owner in self._tokens.items():
            if owner == (namespace, service_account):
                return token
        token = secrets.token_urlsafe(24)
        self._tokens[token] = (namespace, service_account)
        return token

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def authorized(self, namespace: str, account: str, request: Mapping[str, str]) -> bool:
        """RBAC with Roles and RoleBindings in the request's namespace (what a trainer's identity uses)."""
        if not request["namespace"]:
            return False
        for binding in self.emulator.list("RoleBinding", request["namespace"]):
            subjects = binding.get("subjects") or []
            bound = any(
                s.get("kind") == "ServiceAccount"
                and s.get("name") == account
                and s.get("namespace", binding["metadata"]["namespace"]) == namespace
                for s in subjects
            )
            ref = binding.get("roleRef") or {}
            if not bound or ref.get("kind") != "Role":
                continue
            role = self.emulator.get("Role", request["namespace"], ref.get("name", ""))
            if role and any(allows(rule, request) for rule in role.get("rules") or []):
                return True
        return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _refuse(self, code: int, reason: str, message: str) -> None:
                front.denied.append(message)
                body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason}
                self._send(code, json.dumps({**body, "message": message, "code": code}).encode())

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                auth = self.headers.get("Authorization", "")
                owner = front._tokens.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None
                if owner is None:
                    self._refuse(401, "Unauthorized", f"{self.command} {self.path}: no valid bearer token")
                    return
                request = request_attributes(self.command, self.path)
                if not front.authorized(*owner, request):
                    who = f"system:serviceaccount:{owner[0]}:{owner[1]}"
                    what = f'{request["resource"]} "{request["name"]}"' if request["name"] else request["resource"]
                    group = request["group"] or "core"
                    message = f'{what} is forbidden: User "{who}" cannot {request["verb"]} resource in API group '
                    self._refuse(403, "Forbidden", message + f'"{group}" in the namespace "{request["namespace"]}"')
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                upstream = urllib.request.Request(
                    front.emulator.url + self.path, data=body, method=self.command, headers=headers
                )
                try:
                    with urllib.request.urlopen(upstream, timeout=30) as response:
                        self._send(response.status, response.read())
                except urllib.error.HTTPError as err:
                    self._send(err.code, err.read())

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        return Handler
