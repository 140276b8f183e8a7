{{- define "chatstream.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chatstream.serviceAccountName" -}}
{{- default (include "chatstream.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "chatstream.selectorLabels" -}}
app.kubernetes.io/name: chatstream-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "chatstream.labels" -}}
{{ include "chatstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
