// Assembles a running relay from a config: sinks, routes, dispatcher, HTTP server, and an
// orderly stop (stop accepting, answer what is in flight, close the sinks).
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { createDispatcher } from './dispatch.js';
import { createLogger } from './log.js';
import { createMetrics } from './metrics.js';
import { createRouter } from './route.js';
import { createApp, type App } from './server.js';
import { createSink } from '../sinks/index.js';
import type { Sink } from '../sinks/types.js';

export type Relay = {
  app: App;
  url: string;
  port: number;
  sinks: ReadonlyMap<string, Sink>;
  stop(): Promise<void>;
};

export async function startRelay(config: Config, logger: Logger = createLogger(config.log)): Promise<Relay> {
  const sinks = new Map<string, Sink>();
  for (const [name, sinkConfig] of Object.entries(config.sinks)) sinks.set(name, createSink(name, sinkConfig, { logger }));
  await Promise.all([...sinks.values()].map((s) => s.start()));

  const sinkList = [...sinks.values()];
  const metrics = createMetrics(sinkList);
  const sinkDeadlines = new Map<string, number>();
  for (const [name, s] of Object.entries(config.sinks)) if (s.deadline !== undefined) sinkDeadlines.set(name, s.deadline);
  const dispatcher = createDispatcher({ deadlineMs: config.delivery.deadline, sinkDeadlines, metrics });
  const app = createApp({ config, sinks: sinkList, router: createRouter(config.routes, sinks), dispatcher, metrics, logger });

  const { server, port } = await listen(app, config.server.host, config.server.port);
  const shown = config.server.host === '0.0.0.0' || config.server.host === '::' ? '127.0.0.1' : config.server.host;
  const url = `http://${shown.includes(':') ? `[${shown}]` : shown}:${port}`;
  logger.info(
    { url, sinks: [...sinks.keys()] },
    `listening; set Mattermost's Push Notification Server to ${url}${config.server.basePath} (or this host's address)`,
  );

  let stopping: Promise<void> | undefined;
  async function stop() {
    const deadline = Date.now() + config.server.shutdownTimeout;
    server.close();
    server.closeIdleConnections();
    // Answer every request already accepted: their deliveries are bounded by the sink deadline.
    while (app.inFlight() > 0 && Date.now() < deadline) await sleep(20);
    if (app.inFlight() > 0) logger.warn({ inFlight: app.inFlight() }, 'shutdown timeout passed with requests in flight');
    server.closeAllConnections();
    await Promise.all(sinkList.map((s) => s.close().catch((err) => logger.warn({ sink: s.name, err }, 'sink close failed'))));
    logger.info('stopped');
  }

  return { app, url, port, sinks, stop: () => (stopping ??= stop()) };
}

function listen(app: App, hostname: string, port: number): Promise<{ server: Server; port: number }> {
  return new Promise((resolve, reject) => {
    const server = serve({ fetch: app.fetch, hostname, port }, (info: AddressInfo) => resolve({ server, port: info.port })) as Server;
    // Mattermost's client keeps idle connections 90 s (contract §1.1). Closing ours sooner
    // races its next POST on a dying socket, and Go does not retry a POST: a lost push.
    server.keepAliveTimeout = 95_000;
    server.headersTimeout = 96_000;
    server.once('error', (err) => reject(new Error(`cannot listen on ${hostname}:${port}: ${err.message}`)));
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
