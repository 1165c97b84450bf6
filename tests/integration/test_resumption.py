"""TLS session resumption, both directions, never without the decision (issue 14, item 5).

tls.resumption (default on) lets TLS 1.3 peers resume. BoringSSL runs no verify callback
for a resumed handshake, so the sidecar judges the session's stored peer chain itself
(current bundle, validity now, SPIFFE ID, allow/expect list). These tests show that
resumption happens (Python clients, openssl s_client, sidecar to sidecar), that it is
logged and counted, that a peer whose certificate expired since its first handshake, or
that a reload no longer allows, cannot resume, that tickets die with their generation and
listener, and that tls.resumption = false turns it off.

The expiry tests wait on the wall clock only for the test condition itself (a freshly
minted certificate's notAfter), by polling.
"""

from __future__ import annotations

import ssl
import time

import pytest

import harness as h
import httpkit as hk

TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
RESUMED = "portcullis_tls_resumptions_total"


def _wait_past(not_after: float) -> None:
    """Polls the wall clock until notAfter has passed (seconds resolution, plus one)."""
    left = not_after + 1.2 - time.time()
    assert h.wait_until(lambda: time.time() > not_after + 1.2, max(left, 0) + 60, 0.1), \
        "the certificate never expired"


def _roundtrip(s, msg: bytes = b"resume-ping\n") -> None:
    s.sendall(msg)
    assert h.recv_exact(s, len(msg), timeout=h.PROMPT_S) == msg


def _connect(port: int, ctx: ssl.SSLContext, session=None):
    """A served connection: handshake, two echoes (a TLS 1.3 ticket precedes the first echo
    on the wire, so the client holds it afterwards). Returns (session, reused, local port)."""
    s = h.tls_connect(port, ctx, session=session)
    try:
        _roundtrip(s)
        _roundtrip(s)
        return s.session, s.session_reused, s.getsockname()[1]
    finally:
        s.close()


def _attempt(port: int, ctx: ssl.SSLContext, session) -> tuple[bool, int]:
    """One connection offering session: (served?, local port). Served means the echo came
    back; a refusal may show in the handshake or (TLS 1.3) at the first read."""
    raw = h.socket.create_connection((h.HOST, port), timeout=h.T(h.WAIT_S))
    lport = raw.getsockname()[1]
    s = ctx.wrap_socket(raw, server_hostname="api.payments.svc", session=session,
                        do_handshake_on_connect=False)
    try:
        s.do_handshake()
        try:
            s.sendall(b"probe\n")
        except (ssl.SSLError, OSError):
            pass
        return s.recv(64) == b"probe\n", lport
    except (ssl.SSLError, OSError):
        return False, lport
    finally:
        s.close()


def _inbound(env, pki, allow=None, tls=None, identity=("payments-api", None), name="api",
             extra_listeners=(), workers=2):
    app = env.app("echo")
    port = h.free_port()
    cfg = h.base_config(pki, workers=workers, tls=tls, inbound=[
        h.inbound_listener(name, port, app.addr, allow or [{"namespace": "web"}]),
        *extra_listeners])
    if identity[1] is not None:
        cfg["identity"] = {"cert": identity[0], "key": identity[1], "ca": pki.ca}
    return env.sidecar(cfg), port, app, cfg


def _outbound(env, pki, upstream_port: int, tls=None):
    port = h.free_port()
    cfg = h.base_config(pki, "web-frontend", workers=1, tls=tls, outbound=[
        h.outbound_listener("payments", port, h.addr(upstream_port),
                            [{"namespace": "payments", "service_account": "api"}])])
    return env.sidecar(cfg), port


def _through(port: int) -> tuple[bool, int]:
    """One plain connection through an outbound listener: (echo came back?, app port)."""
    s, app_port = h.plain_connect_bound(port)
    if s is None:
        return False, app_port
    try:
        try:
            s.sendall(b"via-outbound\n")
            return h.recv_exact(s, 13, timeout=h.PROMPT_S) == b"via-outbound\n", app_port
        except (OSError, AssertionError):
            return False, app_port
    finally:
        s.close()


# ------------------------------------------------------------------ resumption happens

def test_python_client_resumes_tls13_and_is_logged(env, pki):
    sc, port, _, _ = _inbound(env, pki)
    ctx = h.client_context(pki, "web-frontend", max_version=TLS13)
    sess, reused1, p1 = _connect(port, ctx)
    assert not reused1 and sess.has_ticket, "no TLS 1.3 ticket from the sidecar"
    _, reused2, p2 = _connect(port, ctx, session=sess)
    assert reused2, "the sidecar did not resume a valid session"
    e1, e2 = (sc.log_for_peer_port(p, timeout=h.PROMPT_S) for p in (p1, p2))
    for e, resumed in ((e1, False), (e2, True)):
        h.check_access_entry(e)
        assert e["decision"] == "allow" and e["resumed"] is resumed, e
        # the resumed line's identity comes from the re-judged stored chain
        assert e["peer_id"] == h.spiffe("web", "frontend"), e
    hk.wait_metric(sc, RESUMED, lambda v: v == 1, listener="api", direction="inbound")


def test_tls12_never_resumes(env, pki):
    sc, port, _, _ = _inbound(env, pki)
    ctx = h.client_context(pki, "web-frontend", max_version=TLS12)
    sess, _, _ = _connect(port, ctx)
    assert not sess.has_ticket and sess.id == b"", "TLS 1.2 session ticket or ID issued"
    _, reused, p2 = _connect(port, ctx, session=sess)
    assert not reused
    assert sc.log_for_peer_port(p2, timeout=h.PROMPT_S)["resumed"] is False
    assert hk.scrape(sc).get(RESUMED, listener="api") == 0


def test_s_client_resumes_tls13(env, pki, tmp_path):
    _, port, _, _ = _inbound(env, pki)
    sess = tmp_path / "sess.pem"
    common = ["-cert", pki.crt("web-frontend"), "-key", pki.key("web-frontend"),
              "-CAfile", pki.ca, "-tls1_3"]
    r1 = h.openssl_s_client(port, *common, "-sess_out", str(sess), stdin_data=b"one-echo\n",
                            until=lambda out: "one-echo" in out)
    assert "New, TLSv1.3" in r1.stdout and "TLS session ticket" in r1.stdout, r1.stdout
    r2 = h.openssl_s_client(port, *common, "-sess_in", str(sess), stdin_data=b"two-echo\n",
                            until=lambda out: "two-echo" in out)
    assert "Reused, TLSv1.3" in r2.stdout and "two-echo" in r2.stdout, r2.stdout + r2.stderr


def test_sidecars_resume_between_each_other(env, pki):
    """outbound sidecar -> inbound sidecar: the second and later connections resume, and
    both sides say so."""
    sc_in, in_port, _, _ = _inbound(env, pki)
    sc_out, out_port = _outbound(env, pki, in_port)
    app_ports = []
    for _ in range(3):
        ok, app_port = _through(out_port)
        assert ok, "not served through the sidecar pair"
        app_ports.append(app_port)
    lines = [sc_out.log_for_app_port(p, timeout=h.PROMPT_S) for p in app_ports]
    assert [e["resumed"] for e in lines] == [False, True, True], lines
    assert all(e["peer_id"] == h.spiffe("payments", "api") for e in lines), lines
    hk.wait_metric(sc_out, RESUMED, lambda v: v == 2, listener="payments",
                   direction="outbound")
    hk.wait_metric(sc_in, RESUMED, lambda v: v == 2, listener="api", direction="inbound")


# ------------------------------------------------------------------ ... never without the decision

def test_client_whose_certificate_expired_cannot_resume(env, pki):
    """The session was made while the client's certificate was valid, and the ticket keys
    have not changed since; once the certificate expired the peer is refused (expired),
    as a full handshake would refuse it."""
    sc, port, app, _ = _inbound(env, pki)
    for margin in (h.T(6), h.T(20), h.T(60)):
        crt, key = h.mint_leaf(pki, env.tmp / f"mint-{int(margin)}",
                               f"short-web-{int(margin)}", "web", "frontend", time.time() + margin)
        not_after = h.not_after(crt)
        ctx = h.client_context(pki, None, max_version=TLS13)
        ctx.load_cert_chain(crt, key)
        sess, _, _ = _connect(port, ctx)
        _, reused, _ = _connect(port, ctx, session=sess)
        if time.time() < not_after - 1:
            break
    assert time.time() < not_after - 1, "could not resume before the certificate expired"
    assert reused, "control: the session resumed while the certificate was valid"
    # the ticket lives no longer than the certificate (whole seconds)
    assert sess.ticket_lifetime_hint <= not_after - time.time() + margin, sess.ticket_lifetime_hint
    assert sess.ticket_lifetime_hint < 3600, sess.ticket_lifetime_hint
    before = hk.scrape(sc)
    seen = app.count()

    _wait_past(not_after)
    served, lport = _attempt(port, ctx, sess)
    assert not served, "a client whose certificate expired resumed its session"
    e = sc.log_for_peer_port(lport, timeout=h.PROMPT_S)
    assert app.count() == seen, "the refused peer's connection reached the app"
    h.check_access_entry(e)
    assert (e["decision"], e["reason"]) == ("deny", "expired"), e
    after = hk.scrape(sc)
    assert after.get("portcullis_connections_total", listener="api", decision="deny",
                     reason="expired") == before.get("portcullis_connections_total",
                                                     listener="api", decision="deny",
                                                     reason="expired") + 1
    assert after.get(RESUMED, listener="api") == before.get(RESUMED, listener="api")


def test_upstream_whose_certificate_expired_is_not_resumed(env, pki):
    """Outbound: the cached session of an upstream whose certificate has expired since is
    not used to skip the check; the connection is refused (expired)."""
    for margin in (h.T(6), h.T(20), h.T(60)):
        crt, key = h.mint_leaf(pki, env.tmp / f"mint-up-{int(margin)}",
                               f"short-api-{int(margin)}", "payments", "api", time.time() + margin)
        not_after = h.not_after(crt)
        sc_in, in_port, app, _ = _inbound(env, pki, identity=(crt, key))
        sc_out, out_port = _outbound(env, pki, in_port)
        first, _ = _through(out_port)
        second, p2 = _through(out_port)
        if time.time() < not_after - 1:
            break
        sc_in.kill()
        sc_out.kill()
    assert first and second and time.time() < not_after - 1, "pair not served in time"
    assert sc_out.log_for_app_port(p2, timeout=h.PROMPT_S)["resumed"] is True, \
        "control: the outbound sidecar resumed while the upstream's certificate was valid"
    seen = app.count()

    _wait_past(not_after)
    served, p3 = _through(out_port)
    assert not served, "an upstream whose certificate expired was resumed"
    e = sc_out.log_for_app_port(p3, timeout=h.PROMPT_S)
    h.check_access_entry(e)
    assert (e["decision"], e["reason"]) == ("deny", "expired"), e
    assert e["bytes_to_peer"] == 0, e
    hk.wait_metric(sc_out, "portcullis_connections_total", lambda v: v == 1,
                   listener="payments", decision="deny", reason="expired")
    assert app.count() == seen


def test_reload_refuses_a_no_longer_allowed_peer_and_invalidates_tickets(env, pki):
    # one worker: once a fresh connection sees the new policy, every connection does
    sc, port, app, cfg = _inbound(env, pki, workers=1)
    ctx = h.client_context(pki, "web-frontend", max_version=TLS13)
    fresh = h.client_context(pki, "web-frontend", max_version=TLS13)
    sess, _, _ = _connect(port, ctx)
    _, reused, _ = _connect(port, ctx, session=sess)
    assert reused, "control: resumed before the reload"

    # the allow list drops web: the old session is refused, with the policy's reason
    cfg["inbound"][0]["allow"] = [{"namespace": "jobs"}]
    sc.write_config(cfg)
    sc.sighup()
    assert h.wait_until(lambda: not _attempt(port, fresh, None)[0], h.T(h.PROMPT_S), 0.05), \
        "the new allow list never took effect"
    seen = app.count()
    for _ in range(2):
        served, lport = _attempt(port, ctx, sess)
        assert not served, "a peer the reload no longer allows resumed its session"
        e = sc.log_for_peer_port(lport, timeout=h.PROMPT_S)
        assert (e["decision"], e["reason"]) == ("deny", "not_allowed"), e
    assert app.count() == seen, "a refused peer's connection reached the app"

    # allowed again, by a newer generation: served, but the old ticket is gone
    cfg["inbound"][0]["allow"] = [{"namespace": "web"}]
    sc.write_config(cfg)
    sc.sighup()
    assert h.wait_until(lambda: _attempt(port, fresh, None)[0], h.T(h.PROMPT_S), 0.05)
    _, reused, lport = _connect(port, ctx, session=sess)
    assert not reused, "a ticket of an older generation was accepted"
    assert sc.log_for_peer_port(lport, timeout=h.PROMPT_S)["resumed"] is False


def test_session_is_bound_to_its_listener(env, pki):
    app2 = env.app("echo")
    port2 = h.free_port()
    other = h.inbound_listener("other", port2, app2.addr, [{"namespace": "web"}])
    sc, port, _, _ = _inbound(env, pki, extra_listeners=[other])
    ctx = h.client_context(pki, "web-frontend", max_version=TLS13)
    sess, _, _ = _connect(port, ctx)
    _, reused, _ = _connect(port2, ctx, session=sess)
    assert not reused, "a session of listener api resumed on listener other"
    _, reused, _ = _connect(port, ctx, session=sess)
    assert reused, "control: the session resumes on its own listener"


# ------------------------------------------------------------------ tls.resumption = false

def test_resumption_off(env, pki):
    sc, port, _, _ = _inbound(env, pki, tls={"resumption": False})
    assert sc.admin_get("/config").json()["tls"]["resumption"] is False
    ctx = h.client_context(pki, "web-frontend", max_version=TLS13)
    sess, _, _ = _connect(port, ctx)
    assert not sess.has_ticket, "a ticket was issued with tls.resumption = false"
    _, reused, _ = _connect(port, ctx, session=sess)
    assert not reused


def test_resumption_off_outbound(env, pki):
    """The upstream offers tickets; an outbound sidecar with resumption off never uses one."""
    sc_in, in_port, _, _ = _inbound(env, pki)
    assert sc_in.admin_get("/config").json()["tls"]["resumption"] is True
    sc_out, out_port = _outbound(env, pki, in_port, tls={"resumption": False})
    ports = []
    for _ in range(3):
        ok, p = _through(out_port)
        assert ok
        ports.append(p)
    assert [sc_out.log_for_app_port(p, timeout=h.PROMPT_S)["resumed"] for p in ports] == \
        [False] * 3
    assert hk.scrape(sc_in).get(RESUMED, listener="api") == 0


def test_resumption_must_be_a_boolean(tmp_path, pki, portcullis_bin):
    cfg = h.base_config(pki, tls={"resumption": "yes"}, inbound=[
        h.inbound_listener("api", h.free_port(), "127.0.0.1:9", [{"namespace": "web"}])])
    text, lines = h.render_config(cfg)
    p = tmp_path / "bad.conf"
    p.write_text(text)
    r = h.run_binary("--check", "-c", str(p))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "tls.resumption" in r.stderr and f"{p}:{lines['tls.resumption']}" in r.stderr, r.stderr
    cfg["tls"]["resumption"] = False
    p.write_text(h.render_config(cfg)[0])
    r = h.run_binary("--check", "-c", str(p))
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ HTTP mode's pooled upstreams

@pytest.mark.parametrize("upstream_protocol", ["h2", "http/1.1"])
def test_http_pool_reconnect_resumes(env, pki, upstream_protocol):
    """An outbound HTTP listener's pooled connection closes when idle; the next request's
    new connection resumes, and its request line says so."""
    app = hk.HttpApp(name=f"resapp-{upstream_protocol.replace('/', '')}")
    env.apps.append(app)
    p_in, p_out = h.free_port(), h.free_port()
    sc_in = env.sidecar(h.base_config(pki, "payments-api", workers=1, inbound=[
        h.inbound_listener("api", p_in, app.addr, [{"namespace": "web"}], protocol="http")]))
    out = h.outbound_listener("pay", p_out, h.addr(p_in),
                              [{"namespace": "payments", "service_account": "api"}],
                              protocol="http")
    out["upstream_protocol"] = upstream_protocol
    sc = env.sidecar(h.base_config(pki, "web-frontend", workers=1, outbound=[out],
                                   extra={"http": {"pool_idle_timeout_ms": 100}}))
    for i in range(2):
        c = hk.HttpConn.plain(p_out)
        try:
            c.send(hk.req("GET", f"/r{i}", host="api.payments.svc"))
            assert c.read_response().status == 200
        finally:
            c.close()
        # the pooled upstream connection goes when idle: the next request makes a new one
        hk.wait_metric(sc_in, "portcullis_active_connections", lambda v: v == 0,
                       listener="api")
    lines = [sc.wait_for_log(lambda e, i=i: e.get("path") == f"/r{i}") for i in range(2)]
    assert [e["resumed"] for e in lines] == [False, True], lines
    assert all(e["peer_id"] == h.spiffe("payments", "api") for e in lines), lines
    hk.wait_metric(sc, RESUMED, lambda v: v == 1, listener="pay", direction="outbound")
    hk.wait_metric(sc_in, RESUMED, lambda v: v == 1, listener="api", direction="inbound")
