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
import type { SinkMetrics } from './types.js';

export type ProxyPlatform = 'android' | 'apple';
export type ProxyTransport = '' | 'voip';

/** What one send to the provider came to, for the series below. */
export type ProxyResult = { kind: 'success' } | { kind: 'failure'; reason: string } | { kind: 'removal'; reason: string };

export type ProxyMetrics = {
  /** Counts the notification now and returns the function that records its result and duration. */
  start(n: PushNotification, transport: ProxyTransport): (result: ProxyResult) => void;
};

export function proxyMetrics(m: SinkMetrics, platform: ProxyPlatform): ProxyMetrics {
  const ptt = ['platform', 'type', 'transport'] as const;
  const notifications = m.counter({ name: 'service_notifications_total', help: 'Number of notifications sent', labelNames: ptt });
  const byAppVersion = m.counter({
    name: 'service_notifications_by_app_version_total',
    help: 'Number of notifications sent, by reported app version. A version of 1 indicates a client that did not report an app version.',
    labelNames: ['platform', 'app_version'] as const,
  });
  const success = m.counter({ name: 'service_success_total', help: 'Number of push success.', labelNames: ptt });
  const successWithAck = m.counter({ name: 'service_success_with_ack_total', help: 'Number of push success that contains ackId.', labelNames: ptt });
  const failure = m.counter({ name: 'service_failure_total', help: 'Number of push errors.', labelNames: ptt });
  const failureWithReason = m.counter({
    name: 'service_failure_with_reason_total',
    help: 'Number of push errors with reasons.',
    labelNames: [...ptt, 'reason'] as const,
  });
  const removal = m.counter({ name: 'service_removal_total', help: 'Number of device token errors.', labelNames: ['platform', 'transport', 'reason'] as const });
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
  for (const type of PUSH_TYPES) {
    for (const t of transports) {
      notifications.labels(platform, type, t).inc(0);
      success.labels(platform, type, t).inc(0);
      failure.labels(platform, type, t).inc(0);
    }
  }
  for (const v of ['1', '2', 'other']) byAppVersion.labels(platform, v).inc(0);

  return {
    start(n, transport) {
      const type = n.type && (PUSH_TYPES as readonly string[]).includes(n.type) ? n.type : 'other';
      notifications.labels(platform, type, transport).inc();
      const { appVersion } = parsePlatform(n.platform);
      byAppVersion.labels(platform, appVersion === 1 || appVersion === 2 ? String(appVersion) : 'other').inc();
      const started = performance.now();
      return (result) => {
        const seconds = (performance.now() - started) / 1000;
        providerDuration.observe(seconds);
        notificationDuration.labels(platform).observe(seconds);
        if (result.kind === 'success') {
          success.labels(platform, type, transport).inc();
          if (n.ack_id !== '') successWithAck.labels(platform, type, transport).inc();
          return;
        }
        if (result.kind === 'removal') removal.labels(platform, transport, result.reason).inc();
        failure.labels(platform, type, transport).inc();
        if (result.reason) failureWithReason.labels(platform, type, transport, result.reason).inc();
      };
    },
  };
}
