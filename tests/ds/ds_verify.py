#!/usr/bin/env python3
"""An independent countersign Data Service, written from docs/data-service.md alone.

It verifies the NS's RFC 9421 signature with the `cryptography` package and the standard
library only (no countersign code), refuses replays, answers repeated request ids from memory,
and echoes the body it got:

    python3 tests/ds/ds_verify.py --port 0 --public-key <SEC1 hex> [--url URL]
                                  [--fail-status 500] [--window 300]
                                  [--tls-cert cert.pem --tls-key key.pem]

stdout line 1 is the port it listens on; then one JSON line per request it handled:
    {"outcome": "delivered"|"repeat"|"refused", "reason": ..., "server": ..., "account": ...,
     "user": ..., "headless": ..., "app_instance": ..., "request_id": ..., "body_len": ...,
     "body_sha256": ...}
(never the body itself: app data stays out of logs).
"""

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import re
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

MAX_BODY = 64 * 1024
ALG = "ecdsa-p256-sha256"
# docs/data-service.md, "Signature": every one of these must be covered; countersign-user too
# when the request carries it.
REQUIRED = [
    "@method",
    "@target-uri",
    "content-type",
    "content-digest",
    "countersign-server",
    "countersign-account",
    "countersign-headless",
    "countersign-app-instance",
    "countersign-request-id",
]
HEX32 = re.compile(r"^[0-9a-f]{32}$")


class Refused(Exception):
    """The request is not from the NS (or not any more): answer 401."""


def split_members(value):
    """Top-level members of a structured-field dictionary: split on commas outside quotes,
    parentheses and byte sequences."""
    members, current, quoted, depth, colon = [], [], False, 0, False
    i = 0
    while i < len(value):
        c = value[i]
        if quoted:
            current.append(c)
            if c == "\\" and i + 1 < len(value):
                current.append(value[i + 1])
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
            current.append(c)
        elif c == ":" and depth == 0:
            colon = not colon
            current.append(c)
        elif c == "(":
            depth += 1
            current.append(c)
        elif c == ")":
            depth -= 1
            current.append(c)
        elif c == "," and depth == 0 and not colon:
            members.append("".join(current).strip())
            current = []
        else:
            current.append(c)
        i += 1
    members.append("".join(current).strip())
    out = {}
    for m in members:
        key, sep, rest = m.partition("=")
        if not sep:
            raise Refused("malformed dictionary")
        out[key.strip()] = rest
    return out


def parse_signature_input(member):
    """`("a" "b");created=1;keyid="x"` -> (["a", "b"], {"created": 1, "keyid": "x"})."""
    m = re.fullmatch(r'\(([^)]*)\)(.*)', member)
    if not m:
        raise Refused("malformed signature-input")
    inner, rest = m.group(1), m.group(2)
    components = re.findall(r'"([^"\\]*)"', inner)
    if " ".join('"%s"' % c for c in components) != inner.strip():
        raise Refused("unsupported covered component")
    params = {}
    for key, value in re.findall(r';([a-z*][a-z0-9_.*-]*)=("[^"\\]*"|-?[0-9]{1,15})', rest):
        params[key] = value[1:-1] if value.startswith('"') else int(value)
    return components, params


def byte_sequence(value):
    """`:base64:` -> bytes."""
    value = value.strip()
    if len(value) < 2 or value[0] != ":" or value[-1] != ":":
        raise Refused("malformed byte sequence")
    try:
        return base64.b64decode(value[1:-1], validate=True)
    except binascii.Error:
        raise Refused("malformed byte sequence")


class Memory:
    """Nonces seen within the window (replay) and answers by request id (idempotency)."""

    def __init__(self, window):
        self.window = window
        self.lock = threading.Lock()
        self.nonces = {}
        self.answers = {}

    def first_use(self, keyid, nonce, now):
        with self.lock:
            for k, seen in list(self.nonces.items()):
                if seen < now - 2 * self.window:
                    del self.nonces[k]
            if (keyid, nonce) in self.nonces:
                return False
            self.nonces[(keyid, nonce)] = now
            return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def header(self, name):
        values = self.headers.get_all(name)
        if not values:
            return None
        return ", ".join(v.strip(" \t") for v in values)

    def answer(self, status, body, record):
        print(json.dumps(record), flush=True)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        if length > MAX_BODY:
            self.answer(413, b"too large", {"outcome": "refused", "reason": "too large"})
            return
        body = self.rfile.read(length)
        try:
            seen = self.verify(body)
        except Refused as refused:
            self.answer(401, ("refused: %s" % refused).encode(),
                        {"outcome": "refused", "reason": str(refused)})
            return
        config = self.server.config
        key = (seen["server"], seen["request_id"])
        with self.server.memory.lock:
            stored = self.server.memory.answers.get(key)
        if stored is not None:
            self.answer(stored[0], stored[1], dict(seen, outcome="repeat"))
            return
        if config.fail_status:
            self.answer(config.fail_status, b"failing on purpose", dict(seen, outcome="failed"))
            return
        with self.server.memory.lock:
            self.server.memory.answers[key] = (200, body)
        self.answer(200, body, dict(seen, outcome="delivered"))

    def verify(self, body):
        config = self.server.config
        # 1. The signature labelled sig1 and its parameters.
        signature_input = self.header("Signature-Input")
        signature = self.header("Signature")
        if signature_input is None or signature is None:
            raise Refused("unsigned")
        inputs = split_members(signature_input)
        signatures = split_members(signature)
        if "sig1" not in inputs or "sig1" not in signatures:
            raise Refused("no sig1")
        components, params = parse_signature_input(inputs["sig1"])
        # 2. It covers everything the request carries.
        required = list(REQUIRED)
        if self.header("Countersign-User") is not None:
            required.append("countersign-user")
        for name in required:
            if name not in components:
                raise Refused("%s not covered" % name)
        if params.get("alg") != ALG:
            raise Refused("alg")
        server = self.header("Countersign-Server") or ""
        if not HEX32.match(server) or params.get("keyid") != server:
            raise Refused("keyid")
        # 3. Fresh.
        now = int(time.time())
        created = params.get("created")
        if not isinstance(created, int) or abs(now - created) > config.window:
            raise Refused("stale")
        nonce = params.get("nonce")
        if not isinstance(nonce, str) or not HEX32.match(nonce):
            raise Refused("nonce")
        # 4. The signature base, then the signature.
        scheme = "https" if config.tls else "http"
        target_uri = config.url or ("%s://%s%s" % (scheme, self.headers.get("Host", ""), self.path))
        lines = []
        for name in components:
            if name == "@method":
                value = self.command
            elif name == "@target-uri":
                value = target_uri
            elif name.startswith("@"):
                raise Refused("unsupported derived component")
            else:
                value = self.header(name)
                if value is None:
                    raise Refused("covered field %s absent" % name)
            lines.append('"%s": %s' % (name, value))
        lines.append('"@signature-params": %s' % inputs["sig1"])
        base = "\n".join(lines).encode("ascii")
        raw = byte_sequence(signatures["sig1"])
        if len(raw) != 64:
            raise Refused("signature length")
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        try:
            config.key.verify(der, base, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise Refused("bad signature")
        # 5. The body is the one signed.
        digests = split_members(self.header("Content-Digest") or "")
        if "sha-256" not in digests or not hmac.compare_digest(
                byte_sequence(digests["sha-256"]), hashlib.sha256(body).digest()):
            raise Refused("content-digest")
        # 6. Not seen before (after the signature: only the NS can burn a nonce).
        if not self.server.memory.first_use(server, nonce, now):
            raise Refused("replayed")
        user = self.header("Countersign-User")
        headless = self.header("Countersign-Headless")
        if headless not in ("?0", "?1"):
            raise Refused("countersign-headless")
        return {
            "server": server,
            "account": self.header("Countersign-Account"),
            "user": None if user is None else byte_sequence(user).decode("utf-8"),
            "headless": headless == "?1",
            "app_instance": self.header("Countersign-App-Instance"),
            "request_id": self.header("Countersign-Request-Id"),
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }


class Config:
    pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--public-key", required=True, help="the server's key, SEC1 hex")
    parser.add_argument("--url", help="this DS's URL as configured at the NS")
    parser.add_argument("--fail-status", type=int, default=0)
    parser.add_argument("--window", type=int, default=300)
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    args = parser.parse_args()
    config = Config()
    config.key = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), bytes.fromhex(args.public_key))
    config.url = args.url
    config.fail_status = args.fail_status
    config.window = args.window
    config.tls = bool(args.tls_cert)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if config.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    server.config = config
    server.memory = Memory(args.window)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
