// Routing rules -> which sinks get a notification. Every route whose `match` holds adds its
// sinks (a union, each sink once); within a match every field given must hold, and a field
// holds when the notification's value is one of those listed. No routes: every sink gets
// everything (interface.md).
import type { Config, Match } from './config.js';
import { parsePlatform, type PushNotification } from './contract.js';
import { isRelayToken } from './devices.js';
import type { Sink } from '../sinks/types.js';

export type Router = (n: PushNotification) => Sink[];

export function createRouter(routes: Config['routes'], sinks: ReadonlyMap<string, Sink>): Router {
  const all = [...sinks.values()];
  if (!routes || routes.length === 0) return () => all;
  const compiled = routes.map((r) => ({
    test: compileMatch(r.match),
    sinks: r.sinks.map((name) => sinks.get(name) as Sink),
  }));
  return (n) => {
    const out: Sink[] = [];
    for (const r of compiled) {
      if (!r.test(n)) continue;
      for (const s of r.sinks) if (!out.includes(s)) out.push(s);
    }
    return out;
  };
}

function compileMatch(match: Match): (n: PushNotification) => boolean {
  const tests: Array<(n: PushNotification) => boolean> = [];
  const oneOf = (key: Exclude<keyof Match, 'platform' | 'from_webhook' | 'paired'>, values: string[]) => {
    const set = new Set(values);
    tests.push((n) => set.has(n[key] ?? ''));
  };
  for (const key of ['type', 'sub_type', 'server_id', 'team_id', 'channel_id', 'channel_name', 'sender_name'] as const) {
    const values = match[key];
    if (values) oneOf(key, values);
  }
  if (match.platform) {
    const set = new Set(match.platform);
    tests.push((n) => set.has(n.platform) || set.has(parsePlatform(n.platform).base));
  }
  if (match.from_webhook !== undefined) {
    const want = match.from_webhook;
    tests.push((n) => (n.from_webhook === 'true') === want);
  }
  if (match.paired !== undefined) {
    const want = match.paired;
    tests.push((n) => isRelayToken(n.device_id) === want);
  }
  return (n) => tests.every((t) => t(n));
}
