// `push-relay import-proxy-config FILE`: a mattermost-push-proxy config JSON in, the equivalent
// push-relay YAML out (interface.md, "Drop-in for the official push proxy").
//
// The official proxy's config (contract §5.1; its `server/config_push_proxy.go`): one target per
// ApplePushSettings / AndroidPushSettings entry, keyed by `Type`, which is matched against the
// push's platform with `-vN` cut off. Here each entry becomes a sink named after its Type and a
// route `match: { platform: <Type> }` (a route's platform also matches `<Type>-v2`, as the proxy
// does). Go's encoding/json matches field names case-insensitively and ignores unknown ones;
// so does this reader.
//
// What it prints and how it exits: the YAML of everything it could translate, always; exit 0
// when that is all of it, exit 2 when something could not be translated, each such key named on
// stderr and again in a comment at the top of the YAML, so that nobody deploys it unread.
// Settings push-relay covers differently (timeouts, metrics, log format) become comments.
import { Document, isMap, isScalar, isSeq, type YAMLMap } from 'yaml';
import { parseConfig } from './config.js';

export type Translation = {
  /** The push-relay config, as YAML with comments. */
  yaml: string;
  /** What could not be translated, each naming its key (exit 2 when any). */
  problems: string[];
  /** What was translated loosely or left out on purpose (comments in the YAML, and on stderr). */
  notes: string[];
};

type Json = Record<string, unknown>;

/** The fields of ConfigPushProxy, ApplePushSettings and AndroidPushSettings with their Go types. */
type Kind = 'string' | 'int' | 'bool' | 'array';
const TOP = {
  AndroidPushSettings: 'array',
  ApplePushSettings: 'array',
  ListenAddress: 'string',
  ThrottleVaryByHeader: 'string',
  LogFileLocation: 'string',
  SendTimeoutSec: 'int',
  RetryTimeoutSec: 'int',
  EnableMetrics: 'bool',
  EnableConsoleLog: 'bool',
  EnableFileLog: 'bool',
  LogFormat: 'string',
  ThrottlePerSec: 'int',
  ThrottleMemoryStoreSize: 'int',
} as const satisfies Record<string, Kind>;
const APPLE = {
  Type: 'string',
  ApplePushCertPrivate: 'string',
  ApplePushCertPassword: 'string',
  ApplePushTopic: 'string',
  AppleAuthKeyFile: 'string',
  AppleAuthKeyID: 'string',
  AppleTeamID: 'string',
  ApplePushUseDevelopment: 'bool',
} as const satisfies Record<string, Kind>;
const ANDROID = { Type: 'string', AndroidApiKey: 'string', ServiceFileLocation: 'string' } as const satisfies Record<string, Kind>;

/**
 * An object's fields by their Go names, matched the way encoding/json does (exact name first,
 * then case-insensitively); wrong types are problems, unknown names are notes.
 */
function fields<T extends Record<string, Kind>>(obj: Json, spec: T, where: string, problems: string[], notes: string[]) {
  const out: Record<string, unknown> = {};
  const lower = new Map(Object.keys(spec).map((k) => [k.toLowerCase(), k]));
  for (const [key, value] of Object.entries(obj)) {
    const name = key in spec ? key : lower.get(key.toLowerCase());
    if (!name) {
      notes.push(`${where}${key}: not a mattermost-push-proxy setting; ignored (the proxy ignores it too)`);
      continue;
    }
    if (value === null) continue; // Go leaves the zero value
    const want = spec[name] as Kind;
    const ok =
      want === 'string' ? typeof value === 'string'
      : want === 'bool' ? typeof value === 'boolean'
      : want === 'int' ? Number.isInteger(value)
      : Array.isArray(value);
    if (!ok) {
      problems.push(`${where}${name}: expected ${want === 'int' ? 'an integer' : want === 'array' ? 'an array' : `a ${want}`}, got ${JSON.stringify(value)}`);
      continue;
    }
    if (name in out && key !== name) continue; // the exact name wins over a case-folded one
    out[name] = value;
  }
  return out as { [K in keyof T]?: T[K] extends 'string' ? string : T[K] extends 'bool' ? boolean : T[K] extends 'int' ? number : unknown[] };
}

/** ":8066", "0.0.0.0:8066", "[::1]:8066", "localhost:8066" -> host and port (Go's net.SplitHostPort). */
function listenAddress(value: string): { host?: string; port: number } | undefined {
  const m = /^(?:\[([^\]]*)\]|([^:]*)):(\d{1,5})$/.exec(value.trim());
  if (!m) return undefined;
  const port = Number(m[3]);
  if (port > 65535) return undefined;
  const host = m[1] ?? m[2];
  return { ...(host ? { host } : {}), port };
}

const sinkName = (type: string) => type.replace(/[^A-Za-z0-9_.-]/g, '_') || 'target';

/** Whether this build's config has `server.rateLimit` (interface.md, "Safe to expose"): ask the real parser. */
function hasRateLimit(): boolean {
  try {
    parseConfig({ server: { rateLimit: { perSecond: 1, burst: 1 } }, sinks: { x: { type: 'log' } } }, {});
    return true;
  } catch {
    return false;
  }
}

export function translateProxyConfig(input: unknown, source = 'the config'): Translation {
  const problems: string[] = [];
  const notes: string[] = [];
  if (input === null || typeof input !== 'object' || Array.isArray(input)) {
    return { yaml: '', problems: [`${source}: expected a JSON object (a mattermost-push-proxy config)`], notes };
  }
  const top = fields(input as Json, TOP, '', problems, notes);

  const config: Json = {};
  const comments = new Map<string, string>(); // sink name -> comment above it

  // ---- server ----
  if (top.ListenAddress !== undefined && top.ListenAddress !== '') {
    const addr = listenAddress(top.ListenAddress);
    if (addr) config.server = { host: addr.host ?? '0.0.0.0', port: addr.port };
    else problems.push(`ListenAddress: "${top.ListenAddress}" is not host:port`);
  } else {
    config.server = { host: '0.0.0.0', port: 8066 }; // the proxy's default, ":8066"
  }
  if (top.ThrottlePerSec !== undefined && top.ThrottlePerSec > 0) {
    if (hasRateLimit()) {
      (config.server as Json).rateLimit = { perSecond: top.ThrottlePerSec, burst: top.ThrottlePerSec };
      notes.push(
        `ThrottlePerSec: ${top.ThrottlePerSec} -> server.rateLimit per client address; the proxy counted per ${top.ThrottleVaryByHeader || 'X-Forwarded-For'} header value (set server.trustProxy behind a reverse proxy)`,
      );
    } else {
      notes.push(`ThrottlePerSec: ${top.ThrottlePerSec}: this push-relay has no rate limit; put one in front of it if you relied on this`);
    }
  }
  if (top.ThrottleMemoryStoreSize !== undefined) notes.push('ThrottleMemoryStoreSize: not needed (no throttle store to size)');
  if (top.SendTimeoutSec !== undefined || top.RetryTimeoutSec !== undefined) {
    notes.push(
      'SendTimeoutSec, RetryTimeoutSec: not translated: push-relay answers within delivery.deadline (5s) and retries in the background from its outbox (delivery.ttl, 1h)',
    );
  }
  if (top.EnableMetrics === false) notes.push('EnableMetrics: false: push-relay always serves GET /metrics');
  if (top.LogFormat !== undefined && top.LogFormat !== '') {
    if (top.LogFormat === 'json') config.log = { format: 'json' };
    else if (top.LogFormat !== 'plain') problems.push(`LogFormat: "${top.LogFormat}" is neither plain nor json`);
  }
  if (top.EnableFileLog === true) {
    problems.push(
      `EnableFileLog: push-relay logs to stdout/stderr only; LogFileLocation ${JSON.stringify(top.LogFileLocation || './logs/push_proxy.log')} is not written (redirect the output, or use journald / docker logs)`,
    );
  }

  // ---- targets: Type -> sink, in the proxy's order (Apple first, then Android; a later Type wins) ----
  const targets = new Map<string, { sink: Json; where: string; comment?: string }>();
  const add = (type: string, where: string, sink: Json, comment?: string) => {
    const previous = targets.get(type);
    if (previous) notes.push(`${where}: Type "${type}" again: it replaces ${previous.where}, as in the proxy`);
    targets.set(type, { sink, where, comment });
  };

  (top.ApplePushSettings ?? []).forEach((raw, i) => {
    const where = `ApplePushSettings[${i}]`;
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) return void problems.push(`${where}: expected an object`);
    const a = fields(raw as Json, APPLE, `${where}.`, problems, notes);
    if (!a.Type) return void problems.push(`${where}.Type: missing: nothing routes to this entry`);
    const label = `${where} (${a.Type})`;
    const token = Boolean(a.AppleAuthKeyFile && a.AppleAuthKeyID && a.AppleTeamID);
    const partial = !token && Boolean(a.AppleAuthKeyFile || a.AppleAuthKeyID || a.AppleTeamID);
    if (!token && !a.ApplePushCertPrivate) {
      if (partial) {
        const missing = (['AppleAuthKeyFile', 'AppleAuthKeyID', 'AppleTeamID'] as const).filter((k) => !a[k]);
        return void problems.push(`${label}.${missing.join(', ')}: missing: token auth needs all three, and there is no ApplePushCertPrivate either`);
      }
      // The proxy cannot start this target either ("missing ApplePushCertPrivate") and skips it.
      return void notes.push(`${label}: no credentials (the proxy skips such an entry too); left out`);
    }
    if (!a.ApplePushTopic) return void problems.push(`${label}.ApplePushTopic: empty: the apns sink needs the app's bundle id`);
    const sink: Json = { type: 'apns', topic: a.ApplePushTopic };
    // The proxy prefers the .p8 key when all three are set (contract §5.1).
    if (token) {
      Object.assign(sink, { keyFile: a.AppleAuthKeyFile, keyId: a.AppleAuthKeyID, teamId: a.AppleTeamID });
      if (a.ApplePushCertPrivate) notes.push(`${label}.ApplePushCertPrivate: ignored, as by the proxy: the .p8 key wins`);
    } else {
      if (partial) notes.push(`${label}: AppleAuthKey* incomplete, so the certificate is used, as by the proxy`);
      // One PEM file with the certificate and its private key (apns2 certificate.FromPemFile).
      Object.assign(sink, { cert: a.ApplePushCertPrivate, key: a.ApplePushCertPrivate });
      if (a.ApplePushCertPassword) sink.passphrase = a.ApplePushCertPassword;
    }
    sink.production = a.ApplePushUseDevelopment !== true;
    add(a.Type, label, sink, `${a.Type}: ${token ? 'token auth (.p8)' : 'certificate auth'}, ${sink.production ? 'production' : 'sandbox'}; VoIP pushes go to ${a.ApplePushTopic}.voip`);
  });

  (top.AndroidPushSettings ?? []).forEach((raw, i) => {
    const where = `AndroidPushSettings[${i}]`;
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) return void problems.push(`${where}: expected an object`);
    const a = fields(raw as Json, ANDROID, `${where}.`, problems, notes);
    if (!a.Type) return void problems.push(`${where}.Type: missing: nothing routes to this entry`);
    const label = `${where} (${a.Type})`;
    if (!a.ServiceFileLocation) {
      // The legacy FCM API the server key was for is gone; the proxy ignores the key too.
      if (a.AndroidApiKey) return void problems.push(`${label}.AndroidApiKey: the legacy FCM server key cannot be translated: FCM HTTP v1 needs a service-account file (ServiceFileLocation)`);
      return void notes.push(`${label}: no ServiceFileLocation (the proxy skips such an entry too); left out`);
    }
    if (a.AndroidApiKey) notes.push(`${label}.AndroidApiKey: ignored, as by the proxy (FCM HTTP v1 uses ServiceFileLocation)`);
    add(a.Type, label, { type: 'fcm', serviceAccount: a.ServiceFileLocation }, `${a.Type}: FCM HTTP v1`);
  });

  // ---- sinks and routes ----
  const sinks: Json = {};
  const routes: Json[] = [];
  const used = new Set<string>();
  for (const [type, t] of targets) {
    let name = sinkName(type);
    for (let n = 2; used.has(name); n++) name = `${sinkName(type)}_${n}`;
    used.add(name);
    sinks[name] = t.sink;
    if (t.comment) comments.set(name, t.comment);
    routes.push({ match: { platform: type }, sinks: [name] });
  }
  if (targets.size === 0) {
    problems.push('ApplePushSettings, AndroidPushSettings: no usable entry: the relay would have nothing to deliver to; a log sink stands in');
    sinks.log = { type: 'log' };
  }
  config.sinks = sinks;
  if (routes.length) config.routes = routes;

  return { yaml: render(config, comments, problems, notes, source), problems, notes };
}

function render(config: Json, comments: Map<string, string>, problems: string[], notes: string[], source: string): string {
  const doc = new Document(config);
  const header = [
    ` push-relay config imported from ${source} (push-relay import-proxy-config).`,
    ' Check it with: push-relay check-config FILE; run it with: push-relay serve --config FILE',
    ...(problems.length ? ['', ' NOT TRANSLATED (fix these by hand):', ...problems.map((p) => `   - ${p}`)] : []),
    ...(notes.length ? ['', ' Notes:', ...notes.map((n) => `   - ${n}`)] : []),
    '',
    ' Pushes are verified when you add the server\'s AsymmetricSigningPublicKey (README "Signatures"):',
    ' signatures: { publicKey: "MFkw..." }',
  ];
  doc.commentBefore = header.join('\n');
  const commentKeys = (map: unknown, text: (key: string) => string | undefined) => {
    if (!isMap(map)) return;
    for (const pair of (map as YAMLMap).items) {
      const key = isScalar(pair.key) ? String(pair.key.value) : '';
      const comment = text(key);
      if (comment && isScalar(pair.key)) pair.key.commentBefore = comment;
    }
  };
  commentKeys(doc.get('sinks', true), (name) => (comments.has(name) ? ` ${comments.get(name)}` : undefined));
  const routesNode = doc.get('routes', true);
  if (isSeq(routesNode)) {
    for (const route of routesNode.items) {
      for (const key of ['match', 'sinks']) {
        const node = isMap(route) ? route.get(key, true) : undefined;
        if (node && typeof node === 'object') (node as { flow?: boolean }).flow = true;
      }
    }
  }
  commentKeys(doc.contents, (key) =>
    key === 'routes'
      ? ' By platform, as the proxy routes by Type (android_rn also matches android_rn-v2). A push for a platform\n' +
        ' no route names reaches no sink and is answered OK (the proxy answered FAIL "missing platform property").'
      : undefined,
  );
  return doc.toString({ lineWidth: 0 });
}
