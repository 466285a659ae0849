// The official push proxy's Prometheus series (PP `server/metrics.go`, contract §5.7), kept under
// the same names and labels so a Grafana board built for it keeps working when push-relay
// takes its place. Shared by the FCM and APNs sinks through ctx.metrics (get-or-create: both
// sinks, and a reload, get the one series).
//
// As in PP: `platform` is `android` or `apple` (not the Mattermost platform string),
// `transport` is "" or `voip`, a removal also counts as a failure, and a success with an
// ack_id also counts in service_success_with_ack_total. One difference: an unknown push `type`
// is counted as `other`, so a stray value cannot grow the series without bound.
import { PUSH_TYPES, parsePlatform, type PushNotification } from '../src/contract.js';
import type { Counter } from 'prom-client';
import { tally, type Tally } from '../src/metrics.js';
import type { SinkMetrics } from './types.js';

export type ProxyPlatform = 'android' | 'apple';
export type ProxyTransport = '' | 'voip';

/** What one send to the provider came to, for the series below. */
export type ProxyResult = { kind: 'success' } | { kind: 'failure'; reason: string } | { kind: 'removal'; reason: string };

export type ProxyMetrics = {
  /** Counts the notification now and returns the function that records its result and duration. */
  start(n: PushNotification, transport: ProxyTransport): (result: ProxyResult) => void;
};

/**
 * Each counter's tally (src/metrics.ts: plain numbers handed to prom-client on scrape; each push
 * counts in four series, ~3% of the relay's CPU at 3 500 pushes/s through prom-client's inc()).
 * Keyed by the counter, so that the sinks sharing a series (get-or-create) share its tally too,
 * whichever of them registered it.
 */
const tallies = new WeakMap<object, Tally>();

type Tallied = Pick<Tally, 'inc'> & {
  /** Makes the series exist at 0 (STYLE.md §7). */
  zero(...labels: string[]): void;
};

/** A counter of `m`'s, counted through its tally. */
function tallied(m: SinkMetrics, c: { name: string; help: string; labelNames: readonly string[] }): Tallied {
  const counter = m.counter({
    ...c,
    collect(this: Counter<string>) {
      tallies.get(this)?.flush();
    },
  });
  let t = tallies.get(counter);
  if (!t) tallies.set(counter, (t = tally(counter, c.labelNames.length as 1 | 2 | 3 | 4)));
  return { inc: t.inc, zero: (...labels) => counter.labels(...labels).inc(0) };
}

export function proxyMetrics(m: SinkMetrics, platform: ProxyPlatform): ProxyMetrics {
  const ptt = ['platform', 'type', 'transport'] as const;
  const notifications = tallied(m, { name: 'service_notifications_total', help: 'Number of notifications sent', labelNames: ptt });
  const byAppVersion = tallied(m, {
    name: 'service_notifications_by_app_version_total',
    help: 'Number of notifications sent, by reported app version. A version of 1 indicates a client that did not report an app version.',
    labelNames: ['platform', 'app_version'],
  });
  const success = tallied(m, { name: 'service_success_total', help: 'Number of push success.', labelNames: ptt });
  const successWithAck = tallied(m, { name: 'service_success_with_ack_total', help: 'Number of push success that contains ackId.', labelNames: ptt });
  const failure = tallied(m, { name: 'service_failure_total', help: 'Number of push errors.', labelNames: ptt });
  const failureWithReason = tallied(m, {
    name: 'service_failure_with_reason_total',
    help: 'Number of push errors with reasons.',
    labelNames: [...ptt, 'reason'],
  });
  const removal = tallied(m, { name: 'service_removal_total', help: 'Number of device token errors.', labelNames: ['platform', 'transport', 'reason'] });
  const providerDuration = m.histogram({
    name: platform === 'android' ? 'service_fcm_request_duration_seconds' : 'service_apns_request_duration_seconds',
    help: 'Request latency distribution',
  });
  const notificationDuration = m.histogram({
    name: 'service_notification_duration_seconds',
    help: 'Notifiction request latency distribution',
    labelNames: ['platform'] as const,
  });

  const transports: ProxyTransport[] = platform === 'apple' ? ['', 'voip'] : [''];
  // Every series a dashboard reads exists at 0 from the start.
  for (const type of PUSH_TYPES) {
    for (const t of transports) {
      notifications.zero(platform, type, t);
      success.zero(platform, type, t);
      failure.zero(platform, type, t);
    }
  }
  for (const v of ['1', '2', 'other']) byAppVersion.zero(platform, v);

  return {
    start(n, transport) {
      const type = n.type && (PUSH_TYPES as readonly string[]).includes(n.type) ? n.type : 'other';
      notifications.inc(platform, type, transport);
      const { appVersion } = parsePlatform(n.platform);
      byAppVersion.inc(platform, appVersion === 1 || appVersion === 2 ? String(appVersion) : 'other');
      const started = performance.now();
      return (result) => {
        const seconds = (performance.now() - started) / 1000;
        providerDuration.observe(seconds);
        notificationDuration.labels(platform).observe(seconds);
        if (result.kind === 'success') {
          success.inc(platform, type, transport);
          if (n.ack_id !== '') successWithAck.inc(platform, type, transport);
          return;
        }
        if (result.kind === 'removal') removal.inc(platform, transport, result.reason);
        failure.inc(platform, type, transport);
        if (result.reason) failureWithReason.inc(platform, type, transport, result.reason);
      };
    },
  };
}
