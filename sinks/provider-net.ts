// How the FCM and APNs sinks reach their providers: a TLS connection to the provider's real
// host name, through the CONNECT proxy in HTTPS_PROXY when one is set (NO_PROXY honoured),
// verified against Node's CA store, which includes NODE_EXTRA_CA_CERTS (interface.md,
// "Drop-in for the official push proxy"). Nothing here is configured per sink: PP too takes
// its proxy from the environment (contract §5.1).
//
// The seam: `useProviderConnection(dial)` replaces how a connection is opened (the host, port,
// SNI name and ALPN stay the sink's). An embedding program may route provider traffic its own
// way; the tests point it at local fakes. It is read at every new connection.
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import type { Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';

/** What a sink asks for: the provider's host and port, its SNI name and ALPN list, maybe a client certificate. */
export type DialOptions = ConnectionOptions & { host: string; port: number; servername: string };
export type Dial = (options: DialOptions) => Promise<TLSSocket>;

let override: Dial | undefined;

/** Replaces how provider connections are opened (undefined: back to the default). */
export function useProviderConnection(dial: Dial | undefined): void {
  override = dial;
}

export function dialProvider(options: DialOptions): Promise<TLSSocket> {
  return (override ?? defaultDial)(options);
}

const CONNECT_TIMEOUT_MS = 10_000;

async function defaultDial(options: DialOptions): Promise<TLSSocket> {
  const proxy = proxyFor(options.host, process.env);
  if (!proxy) return tlsConnect(options);
  const socket = await tunnel(proxy, options.host, options.port);
  return tlsConnect({ ...options, socket });
}

/**
 * The proxy for `host` from HTTPS_PROXY / https_proxy, unless NO_PROXY lists it (`*`, an exact
 * name, or a domain suffix with or without a leading dot), as curl and Go's ProxyFromEnvironment do.
 */
export function proxyFor(host: string, env: NodeJS.ProcessEnv): URL | undefined {
  const raw = env.HTTPS_PROXY || env.https_proxy;
  if (!raw) return undefined;
  const noProxy = (env.NO_PROXY || env.no_proxy || '')
    .split(',')
    .map((s) => s.trim().toLowerCase().replace(/:\d+$/, ''))
    .filter(Boolean);
  const h = host.toLowerCase();
  for (const entry of noProxy) {
    if (entry === '*') return undefined;
    const domain = entry.replace(/^\*?\./, '');
    if (h === domain || h.endsWith(`.${domain}`)) return undefined;
  }
  try {
    return new URL(raw.includes('://') ? raw : `http://${raw}`);
  } catch {
    throw new Error(`HTTPS_PROXY is not a URL: ${raw}`);
  }
}

/** An HTTP CONNECT tunnel to host:port through `proxy` (RFC 9110 §9.3.6). */
function tunnel(proxy: URL, host: string, port: number): Promise<Socket> {
  const target = `${host}:${port}`;
  const headers: Record<string, string> = { host: target };
  if (proxy.username) {
    const user = decodeURIComponent(proxy.username);
    const pass = decodeURIComponent(proxy.password);
    headers['proxy-authorization'] = `Basic ${Buffer.from(`${user}:${pass}`).toString('base64')}`;
  }
  const request = proxy.protocol === 'https:' ? httpsRequest : httpRequest;
  return new Promise((resolve, reject) => {
    const req = request({
      host: proxy.hostname.replace(/^\[|\]$/g, ''),
      port: proxy.port || (proxy.protocol === 'https:' ? 443 : 80),
      method: 'CONNECT',
      path: target,
      headers,
      agent: false,
      timeout: CONNECT_TIMEOUT_MS,
    });
    req.once('connect', (res, socket) => {
      if (res.statusCode === 200) return resolve(socket);
      socket.destroy();
      reject(new Error(`proxy ${proxy.host} refused CONNECT ${target}: ${res.statusCode} ${res.statusMessage ?? ''}`.trim()));
    });
    req.once('timeout', () => req.destroy(new Error(`proxy ${proxy.host}: no answer to CONNECT ${target} within ${CONNECT_TIMEOUT_MS} ms`)));
    req.once('error', (err) => reject(new Error(`proxy ${proxy.host}: ${err.message}`)));
    req.end();
  });
}
