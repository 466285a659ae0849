// pino: JSON lines for machines by default, readable lines when a person watches a terminal.
import pino, { type Logger } from 'pino';
import type { Config } from './config.js';

export function createLogger(config: Config['log'], destination?: pino.DestinationStream): Logger {
  const pretty = config.format === 'pretty' || (config.format === 'auto' && process.stdout.isTTY === true);
  const options: pino.LoggerOptions = {
    level: config.level,
    base: { service: 'push-relay' },
    // Credentials never reach a log line, whatever object carries them.
    redact: { paths: ['password', '*.password', 'token', '*.token', 'authorization', '*.authorization'], censor: '***' },
  };
  if (destination) return pino(options, destination);
  if (pretty) {
    return pino({ ...options, transport: { target: 'pino-pretty', options: { colorize: true, ignore: 'pid,hostname,service', translateTime: 'SYS:HH:MM:ss.l' } } });
  }
  return pino(options);
}
