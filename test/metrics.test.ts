// /metrics as Prometheus reads it: every series from the start, counters that add up, and the
// latency histogram in the text format (cumulative buckets, +Inf, _sum, _count).
import { describe, expect, it } from 'vitest';
import { createMetrics } from '../src/metrics.js';
import type { Sink } from '../sinks/types.js';

const sink = (name: string): Sink => ({
  name,
  type: 'test',
  perDevice: false,
  reasons: [['delivered', '']],
  async start() {},
  state: () => ({ ready: true, state: 'ready' }),
  send: async () => ({ kind: 'delivered' }),
  async close() {},
});

const line = (text: string, series: string) => text.split('\n').find((l) => l.startsWith(`${series} `));

describe('metrics', () => {
  it('has every hot-path series at 0 before anything happens', async () => {
    const text = await createMetrics([sink('mqtt')]).registry.metrics();
    expect(line(text, 'push_relay_notifications_received_total{type="message"}')).toMatch(/ 0$/);
    expect(line(text, 'push_relay_replies_total{status="REMOVE"}')).toMatch(/ 0$/);
    expect(line(text, 'push_relay_sink_outcomes_total{sink="mqtt",outcome="queued",reason="deadline"}')).toMatch(/ 0$/);
    expect(line(text, 'push_relay_sink_latency_seconds_count{sink="mqtt"}')).toMatch(/ 0$/);
  });

  it('adds up counts between scrapes and keeps them across scrapes', async () => {
    const m = createMetrics([sink('mqtt')]);
    m.received('message');
    m.received('message');
    m.received('carrier-pigeon');
    m.reply('OK');
    let text = await m.registry.metrics();
    expect(line(text, 'push_relay_notifications_received_total{type="message"}')).toMatch(/ 2$/);
    expect(line(text, 'push_relay_notifications_received_total{type="other"}')).toMatch(/ 1$/);
    m.received('message');
    text = await m.registry.metrics();
    expect(line(text, 'push_relay_notifications_received_total{type="message"}')).toMatch(/ 3$/);
    expect(line(text, 'push_relay_replies_total{status="OK"}')).toMatch(/ 1$/);
  });

  it('writes the latency histogram with cumulative buckets, +Inf, sum and count', async () => {
    const m = createMetrics([sink('mqtt')]);
    for (const s of [0.0007, 0.02, 50]) m.outcome('mqtt', 'delivered', '', s);
    const text = await m.registry.metrics();
    expect(text).toContain('# TYPE push_relay_sink_latency_seconds histogram');
    expect(line(text, 'push_relay_sink_latency_seconds_bucket{le="0.0005",sink="mqtt"}')).toMatch(/ 0$/);
    expect(line(text, 'push_relay_sink_latency_seconds_bucket{le="0.001",sink="mqtt"}')).toMatch(/ 1$/);
    expect(line(text, 'push_relay_sink_latency_seconds_bucket{le="0.025",sink="mqtt"}')).toMatch(/ 2$/);
    expect(line(text, 'push_relay_sink_latency_seconds_bucket{le="10",sink="mqtt"}')).toMatch(/ 2$/);
    expect(line(text, 'push_relay_sink_latency_seconds_bucket{le="+Inf",sink="mqtt"}')).toMatch(/ 3$/);
    expect(line(text, 'push_relay_sink_latency_seconds_count{sink="mqtt"}')).toMatch(/ 3$/);
    expect(Number(line(text, 'push_relay_sink_latency_seconds_sum{sink="mqtt"}')?.split(' ')[1])).toBeCloseTo(50.0207, 4);
  });
});
