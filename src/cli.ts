#!/usr/bin/env node
// The command line: serve, check-config, version.
import { ConfigError, loadConfig, type Config } from './config.js';
import { createLogger } from './log.js';
import { startRelay } from './relay.js';
import { VERSION } from './version.js';

const USAGE = `push-relay: a self-hosted push notification relay for Mattermost

Usage:
  push-relay serve [--config FILE]     run the relay (env PUSH_RELAY_CONFIG=FILE does the same)
  push-relay check-config [FILE]       validate a config file and print the result, start nothing
  push-relay version                   print the version

With no config file the relay listens on 0.0.0.0:8066 and publishes each notification's text
to MQTT topic mm/_notif on the broker at 127.0.0.1:1883 (or an embedded one it starts there).
Env overrides: PUSH_RELAY_HOST, PUSH_RELAY_PORT, PUSH_RELAY_LOG_LEVEL, PUSH_RELAY_MQTT_URL,
PUSH_RELAY_MQTT_TOPIC, PUSH_RELAY_MQTT_AUTO_PORT (see README.md).
`;

function configFile(args: string[]): string | undefined {
  const i = args.findIndex((a) => a === '--config' || a === '-c');
  if (i >= 0) {
    const file = args[i + 1];
    if (!file) fail('--config needs a file name');
    return file;
  }
  const eq = args.find((a) => a.startsWith('--config='));
  if (eq) return eq.slice('--config='.length);
  return process.env.PUSH_RELAY_CONFIG || undefined;
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
  const config = load(configFile(args));
  const logger = createLogger(config.log);
  let relay: Awaited<ReturnType<typeof startRelay>>;
  try {
    relay = await startRelay(config, logger);
  } catch (err) {
    logger.fatal({ err: (err as Error).message }, 'cannot start');
    logger.flush?.();
    setTimeout(() => process.exit(1), 100);
    return;
  }
  let signals = 0;
  const shutdown = (signal: string) => {
    if (++signals > 1) {
      logger.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
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

const [command, ...rest] = process.argv.slice(2);
switch (command) {
  case 'serve':
  case undefined:
    await serve(rest);
    break;
  case 'check-config':
    checkConfig(rest);
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
