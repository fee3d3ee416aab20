#!/usr/bin/env python3
"""An independent OpenID Connect relying party, built on Authlib, run against `countersign
serve` by tests/it/oidc_rp.rs. It knows countersign only through OIDC discovery and the HTML
of the hosted login page, as any RP and browser would.

The phone is the test's: whenever this script needs the user, it prints one line on stdout
and the test acts, then the script carries on by itself:
  QR <file>        the login page's QR code, saved as a PNG: the phone scans it and logs in;
  CIBA <message>   a backchannel authentication request was sent: the phone approves the push.
Each finished check prints `OK <name>`; the last line is `DONE`. Any failure raises, so the
script exits non-zero with the reason on stderr.

Usage: rp_authlib.py ISSUER CLIENT_ID CLIENT_SECRET REDIRECT_URI POST_LOGOUT_URI USERID WORKDIR
"""

import html.parser
import json
import secrets
import sys
import time
import urllib.parse
import warnings

import requests
from authlib.integrations.requests_client import OAuth2Session

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from authlib.jose import JsonWebKey, jwt
    from authlib.oidc.core import CodeIDToken, IDToken

TIMEOUT = 20

# Every secret this RP handled; written to WORKDIR/secrets.json at the end, so the test can
# check that none of them is in the server's log lines or in anything it wrote.
SEEN = []


def keep(*values):
    SEEN.extend(v for v in values if v)


def say(line):
    print(line, flush=True)


def check(condition, what):
    if not condition:
        raise AssertionError(what)


class Page(html.parser.HTMLParser):
    """What a browser would use of the hosted login page: the QR image, the forms and their
    hidden fields, the SSE endpoint."""

    def __init__(self):
        super().__init__()
        self.images = []
        self.forms = []
        self.events = None
        self._form = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "form":
            self._form = {"action": attrs.get("action", ""), "fields": {}}
            self.forms.append(self._form)
        elif tag == "input" and self._form is not None and attrs.get("name"):
            self._form["fields"][attrs["name"]] = attrs.get("value", "")
        if attrs.get("data-events"):
            self.events = attrs["data-events"]

    def handle_endtag(self, tag):
        if tag == "form":
            self._form = None


def wait_logged_in(browser, events_url):
    """Follows the page's server-sent events until the session is logged in."""
    with browser.get(events_url, stream=True, timeout=TIMEOUT,
                     headers={"Accept": "text/event-stream"}) as answer:
        check(answer.status_code == 200, f"events: {answer.status_code}")
        for raw in answer.iter_lines(decode_unicode=True):
            if raw and raw.startswith("data:"):
                state = json.loads(raw[5:].strip()).get("state")
                if state == "logged_in":
                    return
                check(state in ("pending", "scanned"), f"session became {state}")
    raise AssertionError("the event stream ended before the login")


def browser_login(client, browser, meta, workdir, nonce, verifier, n):
    """The browser's part of a code flow: authorize, the login page, the phone, continue.
    Answers the URL the IdP redirected back to."""
    uri, state = client.create_authorization_url(
        meta["authorization_endpoint"], code_verifier=verifier, nonce=nonce)
    answer = browser.get(uri, timeout=TIMEOUT, allow_redirects=True)
    check(answer.status_code == 200, f"login page: {answer.status_code}")
    check("frame-ancestors 'none'" in answer.headers.get("Content-Security-Policy", ""),
          "the login page has no frame-ancestors")
    page = Page()
    page.feed(answer.text)
    qr = [src for src in page.images if "qr" in src]
    check(qr, "no QR image on the login page")
    image = browser.get(urllib.parse.urljoin(answer.url, qr[0]), timeout=TIMEOUT)
    check(image.status_code == 200 and image.content.startswith(b"\x89PNG"), "QR is not a PNG")
    path = f"{workdir}/qr-{n}.png"
    with open(path, "wb") as f:
        f.write(image.content)
    say(f"QR {path}")
    check(page.events, "no event stream on the login page")
    wait_logged_in(browser, urllib.parse.urljoin(answer.url, page.events))
    forms = [f for f in page.forms if f["action"].endswith("/continue")]
    check(forms, "no continue form")
    done = browser.post(urllib.parse.urljoin(answer.url, forms[0]["action"]),
                        data=forms[0]["fields"], timeout=TIMEOUT, allow_redirects=False)
    check(done.status_code in (302, 303), f"continue: {done.status_code} {done.text[:200]}")
    location = done.headers["Location"]
    query = urllib.parse.parse_qs(urllib.parse.urlparse(location).query)
    check(query.get("state") == [state], "state did not come back")
    check(query.get("iss") == [meta["issuer"]], "no RFC 9207 iss")
    check("code" in query, f"no code: {location}")
    keep(query["code"][0], forms[0]["fields"].get("csrf"), *browser.cookies.values())
    return location


def main():
    issuer, client_id, client_secret, redirect_uri, post_logout, userid, workdir = sys.argv[1:8]
    meta = requests.get(f"{issuer}/.well-known/openid-configuration", timeout=TIMEOUT).json()
    check(meta["issuer"] == issuer, "issuer mismatch")
    check("S256" in meta["code_challenge_methods_supported"], "no S256")
    check("ES256" in meta["id_token_signing_alg_values_supported"], "no ES256")
    oauth = requests.get(f"{issuer}/.well-known/oauth-authorization-server", timeout=TIMEOUT)
    check(oauth.status_code == 200 and oauth.json()["issuer"] == issuer, "RFC 8414 metadata")
    keys = JsonWebKey.import_key_set(requests.get(meta["jwks_uri"], timeout=TIMEOUT).json())
    say("OK discovery")

    client = OAuth2Session(client_id, client_secret, scope="openid profile email",
                           redirect_uri=redirect_uri, code_challenge_method="S256",
                           token_endpoint_auth_method="client_secret_basic")
    browser = requests.Session()
    nonce = secrets.token_urlsafe(24)
    verifier = secrets.token_urlsafe(48)
    location = browser_login(client, browser, meta, workdir, nonce, verifier, 1)
    token = client.fetch_token(meta["token_endpoint"], authorization_response=location,
                               code_verifier=verifier)
    check(token["token_type"].lower() == "bearer", "token type")
    keep(client_secret, nonce, verifier, token["access_token"], token.get("refresh_token"),
         token["id_token"])
    claims = jwt.decode(token["id_token"], keys, claims_cls=CodeIDToken,
                        claims_options={"iss": {"essential": True, "value": issuer}},
                        claims_params={"nonce": nonce, "client_id": client_id,
                                       "access_token": token["access_token"]})
    claims.validate(leeway=5)
    check(claims["aud"] == client_id or client_id in claims["aud"], "aud")
    check("hwk" in claims["amr"] and ("pin" in claims["amr"] or "fpt" in claims["amr"]),
          f"amr {claims['amr']}")
    check(claims.get("sid"), "no sid")
    check(claims["sub"] != userid, "sub is the raw userid")
    say("OK code-flow")

    info = client.get(meta["userinfo_endpoint"], timeout=TIMEOUT)
    check(info.status_code == 200, f"userinfo {info.status_code}")
    info = info.json()
    check(info["sub"] == claims["sub"], "userinfo sub differs from the ID token's")
    check(info.get("preferred_username") == userid, f"userinfo {info}")
    say("OK userinfo")

    check("refresh_token" in token, "no refresh token for a continuous session")
    first_refresh = token["refresh_token"]
    refreshed = client.refresh_token(meta["token_endpoint"], refresh_token=first_refresh)
    check(refreshed["access_token"] != token["access_token"], "refresh gave the same token")
    keep(refreshed["access_token"], refreshed.get("refresh_token"))
    check(client.get(meta["userinfo_endpoint"], timeout=TIMEOUT).status_code == 200,
          "userinfo after refresh")
    say("OK refresh")

    seen = client.introspect_token(meta["introspection_endpoint"],
                                   token=refreshed["access_token"]).json()
    check(seen["active"] is True and seen["client_id"] == client_id, f"introspect {seen}")
    client.revoke_token(meta["revocation_endpoint"], token=refreshed["access_token"],
                        token_type_hint="access_token").raise_for_status()
    gone = requests.get(meta["userinfo_endpoint"], timeout=TIMEOUT,
                        headers={"Authorization": f"Bearer {refreshed['access_token']}"})
    check(gone.status_code == 401, f"revoked token still answers {gone.status_code}")
    check("invalid_token" in gone.headers.get("WWW-Authenticate", ""), "no invalid_token")
    seen = client.introspect_token(meta["introspection_endpoint"],
                                   token=refreshed["access_token"]).json()
    check(seen == {"active": False}, f"introspect after revocation {seen}")
    say("OK revocation")

    # RP-initiated logout: the IdP logs the phone's session out and sends the browser back.
    logout_state = secrets.token_urlsafe(8)
    query = urllib.parse.urlencode({"id_token_hint": token["id_token"],
                                    "post_logout_redirect_uri": post_logout,
                                    "state": logout_state})
    out = browser.get(f"{meta['end_session_endpoint']}?{query}", timeout=TIMEOUT,
                      allow_redirects=False)
    check(out.status_code in (302, 303), f"end_session {out.status_code} {out.text[:200]}")
    back = urllib.parse.urlparse(out.headers["Location"])
    check(back._replace(query="").geturl() == post_logout, "not sent to the registered URI")
    check(urllib.parse.parse_qs(back.query).get("state") == [logout_state], "logout state")
    try:
        client.refresh_token(meta["token_endpoint"], refresh_token=refreshed["refresh_token"])
        raise AssertionError("a refresh worked after the session ended")
    except Exception as error:  # Authlib raises OAuthError carrying the RFC's code
        check("invalid_grant" in str(error), f"refresh after logout: {error}")
    say("OK logout")

    # CIBA, poll mode: the phone approves a push login.
    message = f"Pay {secrets.randbelow(900) + 100} EUR"
    request = requests.post(meta["backchannel_authentication_endpoint"], timeout=TIMEOUT,
                            auth=(client_id, client_secret),
                            data={"scope": "openid profile", "login_hint": userid,
                                  "binding_message": message})
    check(request.status_code == 200, f"bc-authorize {request.status_code} {request.text}")
    request = request.json()
    keep(request["auth_req_id"])
    check(request["expires_in"] > 0 and request["interval"] > 0, f"bc-authorize {request}")
    say(f"CIBA {message}")
    deadline = time.monotonic() + 60
    interval = request["interval"]
    pending = 0
    while True:
        check(time.monotonic() < deadline, "CIBA never completed")
        answer = requests.post(meta["token_endpoint"], timeout=TIMEOUT,
                               auth=(client_id, client_secret),
                               data={"grant_type": "urn:openid:params:grant-type:ciba",
                                     "auth_req_id": request["auth_req_id"]})
        body = answer.json()
        if answer.status_code == 200:
            break
        check(answer.status_code == 400, f"CIBA token {answer.status_code} {body}")
        check(body["error"] in ("authorization_pending", "slow_down"), f"CIBA {body}")
        if body["error"] == "slow_down":
            interval += 5
        pending += 1
        time.sleep(interval)
    ciba_claims = jwt.decode(body["id_token"], keys, claims_cls=IDToken,
                             claims_options={"iss": {"essential": True, "value": issuer}},
                             claims_params={"client_id": client_id})
    ciba_claims.validate(leeway=5)
    check(ciba_claims["sub"] == claims["sub"], "CIBA sub differs")
    keep(body["access_token"], body.get("refresh_token"))
    check(pending >= 1, "the first poll was not authorization_pending")
    again = requests.post(meta["token_endpoint"], timeout=TIMEOUT, auth=(client_id, client_secret),
                          data={"grant_type": "urn:openid:params:grant-type:ciba",
                                "auth_req_id": request["auth_req_id"]})
    check(again.status_code == 400 and again.json()["error"] == "invalid_grant",
          f"a second CIBA redemption: {again.status_code} {again.text}")
    say("OK ciba")
    with open(f"{workdir}/secrets.json", "w") as f:
        json.dump({"secrets": sorted(set(SEEN)), "nonce": nonce}, f)
    say("DONE")


if __name__ == "__main__":
    main()
