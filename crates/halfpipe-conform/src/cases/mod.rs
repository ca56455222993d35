//! Every case, grouped by the section of docs/protocol.md it checks.

mod circuit;
mod client;
mod close;
mod common;
mod flow;
mod flow2;
mod link;
mod stream;
mod tls;
mod vegas;

use crate::case::{Case, Role};
use std::time::Duration;

const QUICK: Duration = Duration::from_secs(20);
const SLOW: Duration = Duration::from_secs(40);

macro_rules! exit_case {
    ($f:path, [$($id:literal),+ $(,)?]) => {
        exit_case!($f, [$($id),+], QUICK)
    };
    ($f:path, [$($id:literal),+ $(,)?], $timeout:expr) => {
        Case {
            name: stringify!($f),
            ids: &[$($id),+],
            role: Role::Exit,
            needs: None,
            timeout: $timeout,
            run: $f,
        }
    };
    ($f:path, [$($id:literal),+ $(,)?], needs $needs:literal, $timeout:expr) => {
        Case {
            name: stringify!($f),
            ids: &[$($id),+],
            role: Role::Exit,
            needs: Some($needs),
            timeout: $timeout,
            run: $f,
        }
    };
    ($f:path, [$($id:literal),+ $(,)?], needs $needs:literal) => {
        Case {
            name: stringify!($f),
            ids: &[$($id),+],
            role: Role::Exit,
            needs: Some($needs),
            timeout: QUICK,
            run: $f,
        }
    };
}

macro_rules! client_case {
    ($f:path, [$($id:literal),+ $(,)?]) => {
        client_case!($f, [$($id),+], None, QUICK)
    };
    ($f:path, [$($id:literal),+ $(,)?], $needs:expr, $timeout:expr) => {
        Case {
            name: stringify!($f),
            ids: &[$($id),+],
            role: Role::Client,
            needs: $needs,
            timeout: $timeout,
            run: $f,
        }
    };
}

/// The cases, in the order of the document.
pub fn all() -> Vec<Case> {
    let mut cases = vec![
        // §1, §2
        exit_case!(
            link::exit_speaks_only_after_the_clients_versions,
            ["R1.2", "R1.9", "R1.11", "R2.1"]
        ),
        exit_case!(link::the_highest_common_version_is_adopted, ["R1.3"]),
        exit_case!(link::no_common_version_closes_the_link, ["R1.3", "R1.7"]),
        exit_case!(
            link::an_odd_versions_length_closes_the_link,
            ["R1.4", "R1.7"]
        ),
        exit_case!(
            link::a_first_cell_that_is_not_versions_closes_the_link,
            ["R1.5", "R1.7"]
        ),
        exit_case!(
            link::a_silent_or_partial_handshake_is_closed_after_10_seconds,
            ["R1.6", "R1.7"],
            SLOW
        ),
        exit_case!(link::a_failed_handshake_touches_nothing_else, ["R1.8"]),
        exit_case!(
            link::variable_padding_and_unknown_cells_are_ignored,
            ["R1.10", "R2.2", "R2.6"]
        ),
        exit_case!(link::relay_early_is_handled_as_relay, ["R2.3"]),
        exit_case!(
            link::create_and_create2_get_destroy_protocol,
            ["R2.4", "R2.5"]
        ),
        // §3, §4
        exit_case!(
            circuit::created_fast_carries_y_and_kh,
            ["R3.2", "R3.3", "R3.5"]
        ),
        exit_case!(
            circuit::create_fast_on_a_circid_in_use_destroys_that_circuit,
            ["R3.6", "R3.12"]
        ),
        exit_case!(
            circuit::create_fast_with_the_top_bit_clear_is_a_violation,
            ["R3.6"]
        ),
        exit_case!(
            circuit::a_destroyed_circid_drops_late_cells_and_is_free_again,
            ["R3.7", "R3.11"]
        ),
        exit_case!(
            circuit::circuits_up_to_the_limit_and_resourcelimit_beyond,
            ["R3.9"],
            SLOW
        ),
        exit_case!(circuit::a_circuit_past_the_limit_gets_destroy_resourcelimit, ["R3.8"], needs "circuit-limit"),
        exit_case!(circuit::destroy_aborts_the_circuits_streams, ["R3.10"]),
        exit_case!(
            circuit::a_violation_destroys_only_its_circuit,
            ["R3.12", "R4.8"]
        ),
        exit_case!(circuit::a_lost_link_resets_every_stream, ["R3.13"]),
        exit_case!(
            circuit::cells_for_circuits_never_created_are_dropped,
            ["R3.14"]
        ),
        exit_case!(
            circuit::relay_header_violations_destroy_the_circuit,
            ["R4.4"]
        ),
        exit_case!(
            circuit::relay_cells_are_laid_out_as_specified,
            ["R4.1", "R4.2", "R4.3"]
        ),
        exit_case!(circuit::wrong_way_commands_are_violations, ["R4.6"]),
        exit_case!(circuit::stream_zero_is_a_violation, ["R4.8", "R4.10"]),
        exit_case!(
            circuit::drop_and_unknown_relay_commands_are_dropped,
            ["R4.9"]
        ),
        // §5, §6
        exit_case!(
            stream::begin_connects_and_connected_comes_first_and_once,
            ["R5.3", "R5.4", "R5.20"]
        ),
        exit_case!(
            stream::a_name_is_resolved_then_checked_and_connected,
            ["R5.3"]
        ),
        exit_case!(stream::malformed_begins_get_end_torprotocol, ["R5.5"]),
        exit_case!(
            stream::a_target_outside_the_policy_gets_end_exitpolicy,
            ["R5.6"]
        ),
        exit_case!(
            stream::a_name_that_does_not_resolve_gets_end_resolvefailed,
            ["R5.7"]
        ),
        exit_case!(
            stream::a_refused_connection_gets_end_connectrefused,
            ["R5.8"]
        ),
        exit_case!(
            stream::a_target_that_never_answers_gets_end_timeout,
            ["R5.9"],
            Duration::from_secs(150)
        ),
        exit_case!(stream::an_unreachable_network_gets_end_noroute, ["R5.10"]),
        exit_case!(stream::a_begin_past_the_stream_limit_gets_end_resourcelimit, ["R5.11"], needs "stream-limit"),
        exit_case!(
            stream::a_connect_that_fails_otherwise_gets_end_misc,
            ["R5.12"]
        ),
        exit_case!(
            stream::a_begin_on_an_open_stream_id_is_a_violation,
            ["R5.13"]
        ),
        exit_case!(
            stream::a_begin_on_a_recently_closed_id_opens_a_new_stream,
            ["R5.14"]
        ),
        exit_case!(
            stream::optimistic_data_and_fin_arrive_in_order_once_connected,
            ["R5.15"]
        ),
        exit_case!(
            stream::optimistic_data_for_a_refused_begin_is_discarded,
            ["R5.16"]
        ),
        exit_case!(stream::resolve_is_answered_with_resolved_and_opens_no_stream, ["R5.17", "R5.18"], needs "resolve"),
        exit_case!(stream::a_name_that_does_not_exist_is_resolved_to_one_nontransient_error, ["R5.19"], needs "resolve"),
        exit_case!(
            stream::data_travels_in_order_in_cells_of_at_most_498_bytes,
            ["R6.1", "R6.2", "R6.4"]
        ),
        exit_case!(
            stream::an_empty_data_cell_is_accepted_and_writes_nothing,
            ["R6.3"]
        ),
        // §7, §8, §9
        exit_case!(
            close::the_clients_fin_half_closes_and_the_reply_still_flows,
            ["R4.5", "R7.3", "R7.4", "R7.9", "R7.10"]
        ),
        exit_case!(
            close::the_targets_fin_comes_after_its_data_and_the_request_still_flows,
            ["R7.1", "R7.2", "R7.5", "R7.9", "R7.10"]
        ),
        exit_case!(close::data_or_fin_after_fin_is_a_violation, ["R7.6"]),
        exit_case!(
            close::end_resets_the_target_and_nothing_follows_it,
            ["R7.8", "R8.8", "R8.9"]
        ),
        exit_case!(close::end_discards_what_is_queued_for_the_target, ["R8.8"]),
        exit_case!(
            close::a_target_reset_becomes_end_connreset,
            ["R7.7", "R8.1", "R8.2"]
        ),
        exit_case!(
            close::a_target_reset_while_half_closed_becomes_end_connreset,
            ["R7.7"]
        ),
        exit_case!(close::an_idle_stream_past_its_timeout_gets_end_timeout, ["R8.3", "R8.7"], needs "idle-timeout"),
        exit_case!(
            close::streams_open_at_the_shutdown_deadline_get_end_hibernating,
            ["R8.5", "R8.7"],
            needs "shutdown-grace",
            Duration::from_secs(75)
        ),
        exit_case!(
            close::a_connection_aborted_on_the_host_is_ended_with_misc,
            ["R8.6"]
        ),
        exit_case!(
            close::late_cells_for_closed_and_unknown_streams_are_dropped,
            ["R9.1", "R9.3", "R9.5"]
        ),
        exit_case!(
            close::cells_after_a_clean_close_are_late_cells,
            ["R9.1", "R9.3"]
        ),
        // §10
        exit_case!(
            flow::the_receiver_sends_sendmes_as_data_arrives,
            ["R10.2", "R10.3", "R10.5", "R10.6", "R10.12"]
        ),
        exit_case!(
            flow::the_sender_stops_at_its_windows_and_resumes_on_sendme,
            ["R10.4", "R10.8", "R10.9"]
        ),
        exit_case!(
            flow::a_sendme_beyond_the_start_value_is_a_violation,
            ["R10.11"]
        ),
        exit_case!(
            flow::a_target_that_reads_nothing_holds_back_stream_sendmes,
            ["R10.3", "R10.7", "R10.10"],
            SLOW
        ),
        exit_case!(flow::fin_and_end_take_no_window, ["R10.1"], SLOW),
        // §13, behind `CMD supports tls`
        exit_case!(tls::a_tls_exit_speaks_tls_13_with_its_identity_and_cells_inside, ["R13.1", "R13.3", "R13.4"], needs "tls"),
        exit_case!(tls::a_client_without_alpn_halfpipe_1_gets_no_cell, ["R13.2"], needs "tls"),
        exit_case!(tls::a_plain_link_at_a_tls_exit_is_closed, ["R13.3"], needs "tls"),
        exit_case!(tls::an_exit_serves_any_client_or_only_the_listed_ones, ["R13.6", "R13.7"], needs "tls"),
        exit_case!(tls::a_tampered_record_ends_the_link_and_reaches_no_stream, ["R13.9"], needs "tls"),
        exit_case!(tls::close_notify_ends_a_link_cleanly_and_a_bare_fin_loses_it, ["R13.10"], needs "tls"),
        client_case!(
            tls::a_tls_client_pins_its_exit_and_shows_its_identity,
            ["R13.3", "R13.5", "R13.6", "R13.8"],
            Some("tls"),
            QUICK
        ),
        client_case!(
            tls::a_tls_client_with_another_pin_sends_no_cell,
            ["R13.5"],
            Some("tls"),
            QUICK
        ),
        // §14, behind `CMD supports flow-v2`
        exit_case!(flow2::an_exit_accepts_the_offer_and_nothing_else, ["R14.2"], needs "flow-v2"),
        exit_case!(flow2::circuit_sendmes_every_31_cells_and_no_stream_sendmes, ["R14.4", "R14.8"], needs "flow-v2"),
        exit_case!(flow2::the_exit_sends_within_its_congestion_window, ["R14.5"], needs "flow-v2"),
        exit_case!(flow2::sendmes_for_cells_never_sent_and_stream_sendmes_are_violations, ["R14.6", "R14.8"], needs "flow-v2"),
        exit_case!(vegas::the_exits_window_follows_vegas, ["R14.7"], needs "flow-v2", Duration::from_secs(60)),
        exit_case!(flow2::xoff_when_cells_pile_up_and_xon_when_they_drain, ["R14.9", "R14.10"], needs "flow-v2"),
        exit_case!(flow2::xoff_stops_the_exits_sender_until_xon, ["R14.11"], needs "flow-v2"),
        exit_case!(flow2::xon_and_xoff_take_no_window_and_change_no_state, ["R14.12"], needs "flow-v2"),
        exit_case!(flow2::xon_and_xoff_for_ended_or_unknown_streams_are_dropped, ["R14.13"], needs "flow-v2"),
        exit_case!(flow2::malformed_xon_and_xoff_are_violations, ["R14.14"], needs "flow-v2"),
        exit_case!(flow2::a_sender_that_ignores_xoff_is_a_violation, ["R14.15"], needs "flow-v2"),
        exit_case!(flow2::xon_and_xoff_on_a_v1_circuit_are_dropped, ["R14.16"], needs "flow-v2"),
        client_case!(
            flow2::the_client_offers_v2_and_runs_what_the_exit_answered,
            ["R14.1", "R14.3", "R14.4"],
            Some("flow-v2"),
            QUICK
        ),
        client_case!(
            flow2::a_client_without_v2_makes_no_offer,
            ["R14.1"],
            Some("flow-v2"),
            QUICK
        ),
        // The client's side (§1, §3 to §5, §7 to §9 at the client, §11)
        client_case!(
            client::the_client_begins_with_versions_4_and_creates_circuits_as_specified,
            ["R1.1", "R3.1", "R3.2"]
        ),
        client_case!(client::the_client_checks_kh, ["R3.4"]),
        client_case!(
            client::socks_connects_wait_for_connected_and_half_close_end_to_end,
            ["R11.1", "R5.1", "R5.2", "R11.5", "R7.2", "R7.4"]
        ),
        client_case!(
            client::an_end_before_connected_gets_its_socks_reply,
            ["R8.10", "R11.7", "R11.8", "R11.9", "R11.10", "R11.11", "R11.12"]
        ),
        client_case!(
            client::a_circuit_lost_before_connected_is_a_general_failure,
            ["R11.6"]
        ),
        client_case!(client::bind_and_udp_associate_are_not_supported, ["R11.13"]),
        client_case!(
            client::credentials_isolate_streams_onto_circuits,
            ["R11.2", "R11.4"]
        ),
        client_case!(client::a_begin_sent_to_the_client_is_a_violation, ["R4.7"]),
        client_case!(
            client::the_client_does_not_reuse_recently_closed_ids,
            ["R9.4"]
        ),
        client_case!(
            client::a_circuit_outlives_its_stream_ids,
            ["R9.2", "R5.1"],
            None,
            Duration::from_secs(90)
        ),
        client_case!(
            client::a_stream_that_cannot_have_a_thread_is_ended_with_resourcelimit,
            ["R8.4"],
            None,
            Duration::from_secs(60)
        ),
        client_case!(
            client::without_a_link_socks_fails_at_once_and_the_client_links_again,
            ["R11.15", "R11.16", "R3.13"],
            None,
            SLOW
        ),
        client_case!(
            client::socks4_and_4a_connect_and_fail_with_5b,
            ["R11.3", "R11.14"],
            Some("socks4"),
            QUICK
        ),
    ];
    // Names without their module path: the section is in the IDs.
    for c in &mut cases {
        c.name = c.name.rsplit("::").next().unwrap_or(c.name).trim();
    }
    cases
}
