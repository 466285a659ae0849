# push-relay: multi-stage build, non-root runtime, health check on /healthz.
# Docker does not run on our development machines: this file is kept simple and is not
# exercised by the test suite.

FROM node:20-bookworm-slim AS build
WORKDIR /app
# better-sqlite3 compiles from source when no prebuilt binary matches.
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
COPY sinks ./sinks
RUN npm run build && npm prune --omit=dev

FROM node:20-bookworm-slim
ENV NODE_ENV=production \
    PUSH_RELAY_DATA_DIR=/data \
    PUSH_RELAY_LOG_FORMAT=json
WORKDIR /app
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY package.json config.example.yaml ./
RUN mkdir -p /data && chown node:node /data
USER node
VOLUME /data
EXPOSE 8066
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
  CMD node -e "fetch('http://127.0.0.1:8066/healthz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"
# Through the shebang, which carries the relay's V8 flags (see src/cli.ts).
ENTRYPOINT ["/app/dist/src/cli.js"]
CMD ["serve"]
