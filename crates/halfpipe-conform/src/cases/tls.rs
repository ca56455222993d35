//! §13 (TLS links), behind `CMD supports tls`: the implementation started
//! with `--link tls --data-dir DIR`, its fingerprint read with
//! `--print-fingerprint`; the kit's own TLS client and exit (`crate::tls`).

use super::common::*;
use crate::case::{check, fail, CaseError, Ctx, Verdict};
use crate::link::{RawLink, ANSWER, VERSIONS_4};
use crate::targets::{ending, Ending, Target};
use crate::tls::{self, KitIdentity, Seen, ALPN};
use halfpipe_proto::relay::relay_cmd;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

/// A TLS link from the kit; `Err` says why the handshake failed.
fn tls_link(
    cx: &Ctx,
    addr: SocketAddr,
    alpn: &[&[u8]],
    identity: Option<&KitIdentity>,
) -> Result<(Result<RawLink, String>, Arc<Seen>), CaseError> {
    let seen = Arc::new(Seen::default());
    let config = tls::client_config(alpn, identity, seen.clone());
    Ok((RawLink::connect_tls(addr, config, &cx.trace)?, seen))
}

/// A TLS link with ALPN halfpipe/1, `identity` shown if asked, its VERSIONS
/// handshake done and circuit CIRC made; `served` is what a failed TLS
/// handshake fails.
fn tls_linked(
    cx: &Ctx,
    addr: SocketAddr,
    identity: Option<&KitIdentity>,
    served: &str,
) -> Result<RawLink, CaseError> {
    let (l, _) = tls_link(cx, addr, &[ALPN], identity)?;
    let mut l = l.map_err(|why| fail(served, why))?;
    l.handshake()?;
    l.create_circuit(CIRC)?;
    Ok(l)
}

/// After a TLS handshake the exit did not mean to serve: our VERSIONS
/// must get no VERSIONS, only the end of the connection.
fn refused_after_handshake(l: &mut RawLink, why: &str) -> Verdict {
    let _ = l.send_raw(&VERSIONS_4, "VERSIONS [4]");
    expect_closed_without_versions(l, why)
}

pub fn a_tls_exit_speaks_tls_13_with_its_identity_and_cells_inside(cx: &mut Ctx) -> Verdict {
    // R13.1: TLS 1.3, and a ClientHello that offers 1.2 only is refused;
    // R13.4: the certificate carries the key whose fingerprint the exit
    // prints (rustls checked CertificateVerify); R13.3: VERSIONS and every
    // cell inside TLS.
    let (addr, fp) = cx.tls_exit(&[])?;
    let (l, seen) = tls_link(cx, addr, &[ALPN], None)?;
    let mut l = l.map_err(|why| fail("a TLS 1.3 handshake with ALPN halfpipe/1 (R13.1)", why))?;
    check(
        seen.get().as_deref() == Some(fp.as_str()),
        format!("the certificate of the printed fingerprint {fp} (R13.4)"),
        format!("{:?}", seen.get()),
    )?;
    l.handshake()?;
    l.create_circuit(CIRC)?;
    circuit_works(&mut l, CIRC, 1)?;
    let mut s = TcpStream::connect(addr).map_err(|e| fail("a connection", e.to_string()))?;
    s.set_read_timeout(Some(ANSWER)).ok();
    s.write_all(&tls::tls12_client_hello())
        .map_err(|e| fail("to send a ClientHello", e.to_string()))?;
    let mut first = [0u8; 1];
    match s.read(&mut first) {
        Ok(1) if first[0] == 0x16 => Err(fail(
            "no ServerHello for a ClientHello that offers TLS 1.2 only (R13.1)",
            "a handshake record",
        )),
        _ => Ok(()),
    }
}

pub fn a_client_without_alpn_halfpipe_1_gets_no_cell(cx: &mut Ctx) -> Verdict {
    // R13.2: no ALPN: closed, no cell read or sent; other protocols only:
    // refused during the handshake.
    let (addr, _) = cx.tls_exit(&[])?;
    let (l, _) = tls_link(cx, addr, &[], None)?;
    if let Ok(mut l) = l {
        refused_after_handshake(&mut l, "no ALPN, R13.2")?;
    }
    let (l, _) = tls_link(cx, addr, &[b"h2"], None)?;
    check(
        l.is_err(),
        "the handshake refused for ALPN h2 only (R13.2)",
        "a TLS session",
    )
}

pub fn a_plain_link_at_a_tls_exit_is_closed(cx: &mut Ctx) -> Verdict {
    // R13.3: no cell before the TLS handshake: a plain VERSIONS is closed.
    let (addr, _) = cx.tls_exit(&[])?;
    let mut l = RawLink::connect(addr, &cx.trace)?;
    l.send_raw(&VERSIONS_4, "a plain VERSIONS")?;
    expect_closed_without_versions(&mut l, "a plain VERSIONS at a TLS exit, R13.3")
}

pub fn an_exit_serves_any_client_or_only_the_listed_ones(cx: &mut Ctx) -> Verdict {
    // R13.7: without a list, no client certificate is required; with
    // one, only listed keys are served. R13.6: the listed client's
    // certificate has an odd name and expired long ago, which must not
    // matter.
    let (addr, _) = cx.tls_exit(&[])?;
    let _any = tls_linked(
        cx,
        addr,
        None,
        "a client without a certificate served (R13.7)",
    )?;
    let listed = KitIdentity::new(true);
    let unlisted = KitIdentity::new(false);
    let list = cx.dir.join("authorized-clients");
    std::fs::write(
        &list,
        format!("# the kit's client\n{}\n", listed.fingerprint),
    )
    .map_err(|e| fail("the client list", e.to_string()))?;
    let list = list.display().to_string();
    let (addr, _) = cx.tls_exit(&["--authorized-clients", &list])?;
    let _listed = tls_linked(
        cx,
        addr,
        Some(&listed),
        "the listed client served (R13.7, R13.6)",
    )?;
    for (who, id) in [
        ("an unlisted client", Some(&unlisted)),
        ("a client without a certificate", None),
    ] {
        let (l, _) = tls_link(cx, addr, &[ALPN], id)?;
        if let Ok(mut l) = l {
            refused_after_handshake(&mut l, &format!("{who}, R13.7"))?;
        }
    }
    Ok(())
}

pub fn a_tampered_record_ends_the_link_and_reaches_no_stream(cx: &mut Ctx) -> Verdict {
    // R13.9: the link is lost (R3.13: the stream reset), and none of the
    // record's bytes reach the target.
    let (addr, _) = cx.tls_exit(&[])?;
    let mut l = tls_linked(cx, addr, None, "a TLS link")?;
    let t = Target::new();
    let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
    let mut cell = Vec::new();
    halfpipe_proto::relay::encode(&mut cell, CIRC, relay_cmd::DATA, 1, b"TAMPERED");
    l.send_tampered(&cell)?;
    match ending(&mut conn, ANSWER) {
        Ending::Reset(got) | Ending::Eof(got) if got.windows(8).any(|w| w == b"TAMPERED") => {
            Err(fail(
                "no byte of a record that failed authentication (R13.9)",
                "the record's data",
            ))
        }
        Ending::Reset(_) => Ok(()),
        other => Err(fail(
            "the stream reset: the link is lost (R13.9, R3.13)",
            short(&other),
        )),
    }
}

pub fn close_notify_ends_a_link_cleanly_and_a_bare_fin_loses_it(cx: &mut Ctx) -> Verdict {
    // R13.10: after our close_notify, or a FIN without one (a lost link,
    // R3.13), the stream is reset.
    let (addr, _) = cx.tls_exit(&[])?;
    for clean in [true, false] {
        let mut l = tls_linked(cx, addr, None, "a TLS link")?;
        let t = Target::new();
        let mut conn = open_stream(&mut l, CIRC, 1, &t)?;
        if clean {
            // The exit's own close_notify in answer is a SHOULD: not checked.
            l.close_notify();
        } else {
            l.shutdown_write();
        }
        match ending(&mut conn, ANSWER) {
            Ending::Reset(_) => {}
            other => {
                return Err(fail(
                    format!(
                        "the stream reset when the link ends ({}, R13.10, R3.13)",
                        if clean { "close_notify" } else { "a bare FIN" }
                    ),
                    short(&other),
                ))
            }
        }
    }
    Ok(())
}

pub fn a_tls_client_pins_its_exit_and_shows_its_identity(cx: &mut Ctx) -> Verdict {
    // R13.5: pinned to the kit exit's key, the client links (R13.6: that
    // exit's certificate has an odd name and expired long ago); R13.8: it
    // shows the key it prints; R13.3: VERSIONS inside TLS (`tls_client`
    // checks it); R13.1: the kit's exit speaks TLS 1.3 only.
    let exit = KitIdentity::new(true);
    let c = cx.tls_client(&exit, &exit.fingerprint.clone())?;
    let (fp, seen) = (c.fingerprint, c.seen);
    let mut rig = c
        .rig
        .map_err(|why| fail("the pinned client to link (R13.5, R13.6)", why))?;
    check(
        seen.get().as_deref() == Some(fp.as_str()),
        format!("the client's certificate of fingerprint {fp} (R13.8)"),
        format!("{:?}", seen.get()),
    )?;
    rig.settle()
}

pub fn a_tls_client_with_another_pin_sends_no_cell(cx: &mut Ctx) -> Verdict {
    // R13.5: a key other than the pinned one: the handshake is aborted and
    // no cell is sent.
    let exit = KitIdentity::new(false);
    let other = KitIdentity::new(false);
    match cx.tls_client(&exit, &other.fingerprint.clone())?.rig {
        Err(_) => Ok(()),
        Ok(_) => Err(fail(
            "no link to an exit whose key is not the pinned one (R13.5)",
            "a link, VERSIONS and all",
        )),
    }
}
