#!/usr/bin/env -S node --max-semi-space-size=8
// The command line: serve, check-config, version, outbox, dead-letters, send, vapid, devices.
//
// The V8 flag halves the young generation (16 -> 8 MB semi-spaces): ~30 MB less resident
// memory for a few percent of throughput (bench/README.md). npm start, the Dockerfile and the
// benchmarks all run this file through its shebang, so the flag lives here only.
import { readFileSync } from 'node:fs';
import { devicesCommand, vapidGenerate, type CliTools } from './cli-devices.js';
import { ConfigError, loadConfig, type Config } from './config.js';
import { translateProxyConfig } from './import-proxy-config.js';
import { configSecrets, createLogger } from './log.js';
import { watchConfigFile, type ReloadResult } from './reload.js';
import { sinkPolicy, startRelay } from './relay.js';
import { openStore, type PendingDelivery } from './store/index.js';
import { VERSION } from './version.js';

const USAGE = `push-relay: a self-hosted push notification relay for Mattermost

Usage:
  push-relay serve [--config FILE]     run the relay (env PUSH_RELAY_CONFIG=FILE does the same);
                                       SIGHUP or a change of FILE reloads it
  push-relay check-config [FILE]       validate a config file and print the result, start nothing
  push-relay outbox stats|list|retry|purge [--sink NAME] [--limit N] [--config FILE]
                                       inspect the outbox; retry makes every pending delivery due now
  push-relay dead-letters list|replay [ID ...|--all] [--limit N] [--config FILE]
                                       inspect or replay deliveries given up on
  push-relay send [--url URL] [--message TEXT] [--channel NAME] [--type TYPE]
                                       post a test notification the way Mattermost does, print the reply
  push-relay import-proxy-config FILE  print the push-relay YAML for a mattermost-push-proxy config JSON
                                       (exit 2, naming each one, when something cannot be translated)
  push-relay vapid generate [--subject mailto:ADDR]
                                       print a VAPID key pair and the webpush sink config lines for it
  push-relay devices list [--json] [--config FILE]
                                       the devices this relay issued tokens for (paired browsers)
  push-relay devices add --webpush FILE [--label TEXT] [--config FILE]
                                       register a browser's PushSubscription JSON; prints the device id
                                       to attach in Mattermost as its last line
  push-relay devices remove TOKEN [--config FILE]
                                       delete a device (its pushes then answer REMOVE)
  push-relay version                   print the version

With no config file the relay listens on 0.0.0.0:8066 and publishes each notification's text
to MQTT topic mm/_notif on the broker at 127.0.0.1:1883 (or an embedded one it starts there).
Env overrides: PUSH_RELAY_HOST, PUSH_RELAY_PORT, PUSH_RELAY_LOG_LEVEL, PUSH_RELAY_MQTT_URL,
PUSH_RELAY_MQTT_TOPIC, PUSH_RELAY_MQTT_AUTO_PORT (see README.md).
`;

/** The value of `NAME VALUE` or `NAME=VALUE`, for any of `names`. */
function option(args: string[], ...names: string[]): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string;
    for (const name of names) {
      if (a === name) {
        const value = args[i + 1];
        if (value === undefined) fail(`${name} needs a value`);
        return value;
      }
      if (a.startsWith(`${name}=`)) return a.slice(name.length + 1);
    }
  }
  return undefined;
}

function configFile(args: string[]): string | undefined {
  return option(args, '--config', '-c') ?? (process.env.PUSH_RELAY_CONFIG || undefined);
}

function fail(message: string, code = 2): never {
  process.stderr.write(`push-relay: ${message}\n`);
  process.exit(code);
}

function load(file: string | undefined): Config {
  try {
    return loadConfig(file);
  } catch (err) {
    if (err instanceof ConfigError) fail(`${err.message}\n(${file ? `config file ${file}` : 'built-in defaults and env'})`);
    throw err;
  }
}

async function serve(args: string[]) {
  const file = configFile(args);
  const config = load(file);
  const secrets = { values: configSecrets(config) };
  const logger = createLogger(config.log, undefined, secrets);
  let relay: Awaited<ReturnType<typeof startRelay>>;
  try {
    // POST /admin/reload does what SIGHUP does (it needs admin.token, as every /admin path).
    relay = await startRelay(config, logger, { reloadFromSource: () => reload('POST /admin/reload') });
  } catch (err) {
    logger.fatal({ err: (err as Error).message }, 'cannot start');
    logger.flush?.();
    setTimeout(() => process.exit(1), 100);
    return;
  }

  // A reload (interface.md): SIGHUP, or a change of the config file. The new config is read
  // and validated whole; an invalid one is refused with the key named and the old one stays.
  const reload = (why: string): Promise<ReloadResult> => {
    watcher?.sync();
    let next: Config;
    try {
      next = loadConfig(file);
    } catch (err) {
      const problems = err instanceof ConfigError ? err.problems : [(err as Error).message];
      logger.error({ trigger: why, problems }, `config reload refused, the running config stays: ${problems.join('; ')}`);
      return Promise.resolve({ ok: false, problems });
    }
    secrets.values = [...new Set([...secrets.values, ...configSecrets(next)])];
    return relay.reload(next).then((result) => {
      if (result.ok) {
        logger.info({ trigger: why, changes: result.changes }, `config reloaded: ${result.changes.join(', ') || 'nothing changed'}`);
      } else {
        logger.error({ trigger: why, problems: result.problems }, `config reload refused, the running config stays: ${result.problems.join('; ')}`);
      }
      return result;
    });
  };
  // Node's default for SIGHUP is to exit: a log rotation or `systemctl reload` took the relay down.
  const watcher = file ? watchConfigFile(file, () => void reload('file changed')) : undefined;
  process.on('SIGHUP', () => void reload('SIGHUP'));

  let signals = 0;
  const shutdown = (signal: string) => {
    if (++signals > 1) {
      logger.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    watcher?.close();
    logger.info({ signal }, 'shutting down: answering requests in flight, then closing sinks');
    relay.stop().then(
      () => {
        logger.flush?.();
        process.exit(0);
      },
      (err) => {
        logger.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));
}

function checkConfig(args: string[]) {
  const file = args.find((a) => !a.startsWith('-')) ?? configFile(args);
  const config = load(file);
  const sinks = Object.entries(config.sinks).map(([name, s]) => `${name} (${s.type})`);
  process.stdout.write(
    `${file ?? 'built-in defaults'}: OK\n  listen: ${config.server.host}:${config.server.port}${config.server.basePath}\n` +
      `  sinks: ${sinks.join(', ')}\n  routes: ${config.routes?.length ?? 'none (every sink gets everything)'}\n`,
  );
}

/** The YAML on stdout; problems and notes on stderr; exit 2 when something was not translated. */
function importProxyConfig(args: string[]) {
  const file = args.find((a) => !a.startsWith('-') || a === '-');
  if (!file) fail('import-proxy-config needs the mattermost-push-proxy config file (or - for stdin)');
  let input: unknown;
  try {
    input = JSON.parse(readFileSync(file === '-' ? 0 : file, 'utf8'));
  } catch (err) {
    fail(`${file}: ${err instanceof SyntaxError ? 'not valid JSON: ' : 'cannot read: '}${(err as Error).message}`, 1);
  }
  const { yaml, problems, notes } = translateProxyConfig(input, file === '-' ? 'stdin' : file);
  process.stdout.write(yaml);
  for (const n of notes) process.stderr.write(`push-relay: note: ${n}\n`);
  for (const p of problems) process.stderr.write(`push-relay: cannot translate: ${p}\n`);
  if (problems.length) process.exitCode = 2;
}

/** Positional words: the arguments that are neither options nor their values. */
function words(args: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string;
    if (a === '--all') continue;
    if (a.startsWith('-')) {
      if (!a.includes('=')) i++;
      continue;
    }
    out.push(a);
  }
  return out;
}

function describeRow(r: PendingDelivery & { reason?: string; failedAt?: number }): string {
  const age = Math.round((Date.now() - r.createdAt) / 1000);
  const n = JSON.parse(r.payload) as { type?: string; channel_name?: string };
  const due = r.reason === undefined ? ` due ${r.nextAttemptAt <= Date.now() ? 'now' : `in ${Math.round((r.nextAttemptAt - Date.now()) / 1000)}s`}` : '';
  return (
    `#${r.id} sink=${r.sink} ack_id=${r.ackId || '-'} type=${n.type ?? '-'} age=${age}s attempts=${r.attempts}${due}` +
    (r.reason !== undefined ? `\n    reason: ${r.reason}` : r.lastError ? `\n    last error: ${r.lastError}` : '')
  );
}

async function storeCommand(kind: 'outbox' | 'dead-letters', args: string[]) {
  const config = load(configFile(args));
  const [action = kind === 'outbox' ? 'stats' : 'list', ...ids] = words(args);
  const limit = Number(option(args, '--limit') ?? 50);
  const sink = option(args, '--sink');
  const store = await openStore(config.store, config.dataDir, false);
  if (!store) fail('store is "none": there is no outbox');
  const out = (s: string) => process.stdout.write(`${s}\n`);
  try {
    if (kind === 'outbox' && action === 'stats') {
      const st = await store.stats();
      out(`outbox: ${st.depth} pending${st.oldestCreatedAt ? `, oldest ${Math.round((Date.now() - st.oldestCreatedAt) / 1000)}s old` : ''}`);
      for (const [name, count] of Object.entries(st.bySink)) out(`  ${name}: ${count}`);
      out(`dead letters: ${st.deadLetters}`);
    } else if (kind === 'outbox' && action === 'list') {
      const rows = await store.list(limit);
      for (const r of rows) out(describeRow(r));
      if (!rows.length) out('outbox is empty');
    } else if (kind === 'outbox' && action === 'retry') {
      out(`${await store.retryNow(sink)} deliveries due now; a running relay sends them within a second`);
    } else if (kind === 'outbox' && action === 'purge') {
      if (!args.includes('--yes')) fail('purge deletes pending notifications for good: add --yes to confirm');
      out(`${await store.purge(sink)} deliveries deleted`);
    } else if (kind === 'dead-letters' && action === 'list') {
      const rows = await store.deadLetters(limit);
      for (const r of rows) out(describeRow(r));
      if (!rows.length) out('no dead letters');
    } else if (kind === 'dead-letters' && action === 'replay') {
      const which = args.includes('--all') ? 'all' : ids.map(Number);
      if (which !== 'all' && (which.length === 0 || which.some((id) => !Number.isInteger(id)))) {
        fail('dead-letters replay needs dead letter ids (see dead-letters list) or --all');
      }
      const moved = await store.replay(which, Date.now(), (s) => sinkPolicy(config, s).ttlMs);
      out(`${moved} dead letters back in the outbox, due now`);
    } else {
      fail(`unknown ${kind} action "${action}"\n\n${USAGE}`);
    }
  } finally {
    await store.close();
  }
}

/**
 * Posts one notification shaped like Mattermost's (contract §2: a channel post, fresh 26-char
 * ack_id, no Content-Type, User-Agent Mattermost-Bot/1.1) and prints the relay's reply.
 */
async function sendCommand(args: string[]) {
  const url = (option(args, '--url') ?? `http://127.0.0.1:${process.env.PUSH_RELAY_PORT || 8066}`).replace(/\/+$/, '');
  const alphabet = 'abcdefghijkmnopqrstuwxyz13456789';
  const id = () => Array.from({ length: 26 }, () => alphabet[Math.floor(Math.random() * alphabet.length)]).join('');
  const type = option(args, '--type') ?? 'message';
  const push = {
    ack_id: id(),
    platform: 'android_rn-v2',
    server_id: id(),
    device_id: `push-relay-send:${id()}`,
    post_id: type === 'message' ? id() : '',
    ...(type === 'message' ? { category: 'CAN_REPLY', message: option(args, '--message') ?? '@push-relay: hello from push-relay send', badge: 1 } : {}),
    channel_id: id(),
    channel_name: option(args, '--channel') ?? 'Town Square',
    type,
    sender_name: '@push-relay',
    version: 'v2',
    is_crt_enabled: false,
    is_id_loaded: false,
    signature: '',
  };
  const res = await fetch(`${url}/api/v1/send_push`, {
    method: 'POST',
    headers: { 'User-Agent': 'Mattermost-Bot/1.1' },
    body: Buffer.from(JSON.stringify(push)),
  }).catch((err: Error) => fail(`cannot reach ${url}: ${(err.cause as Error | undefined)?.message ?? err.message}`, 1));
  const text = await res.text();
  process.stdout.write(`${res.status} ${text}\n`);
  let status: unknown;
  try {
    status = (JSON.parse(text) as { status?: unknown }).status;
  } catch {
    /* not a contract reply */
  }
  if (res.status !== 200 || status !== 'OK') process.exit(1);
}

const cliTools: CliTools = { option, fail, out: (line) => process.stdout.write(`${line}\n`) };

const [command, ...rest] = process.argv.slice(2);
switch (command) {
  case 'serve':
  case undefined:
    await serve(rest);
    break;
  case 'check-config':
    checkConfig(rest);
    break;
  case 'outbox':
  case 'dead-letters':
    await storeCommand(command, rest);
    break;
  case 'send':
    await sendCommand(rest);
    break;
  case 'import-proxy-config':
    importProxyConfig(rest);
    break;
  case 'vapid':
    if (rest[0] !== 'generate') fail(`unknown vapid action "${rest[0] ?? ''}": generate`);
    await vapidGenerate(rest, cliTools);
    break;
  case 'devices':
    await devicesCommand(rest, load(configFile(rest)), cliTools);
    break;
  case 'version':
  case '--version':
    process.stdout.write(`${VERSION.version} (${VERSION.hash})\n`);
    break;
  case 'help':
  case '--help':
  case '-h':
    process.stdout.write(USAGE);
    break;
  default:
    fail(`unknown command "${command}"\n\n${USAGE}`);
}
